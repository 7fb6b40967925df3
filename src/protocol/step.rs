//! The steps of provisioning, as progress callbacks report them and timeouts name them.

/// A stage of an operation, as reported to progress callbacks and in timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(C)]
pub enum Step {
    Connecting = 0,
    Subscribing = 1,
    Subscribed = 2,
    CreatingCertificate = 3,
    CertificateCreated = 4,
    Registering = 5,
    Registered = 6,
    Verifying = 7,
    Verified = 8,
    /// A certificate from the resume journal is taken up.
    Resuming = 9,
    /// The journal's certificate cannot be used (token expired, refused): a new one is made.
    Restarting = 10,
    /// An attempt failed; the next starts after a pause.
    Retrying = 11,
    /// Done: the credentials are written (when there is an output directory) and the journal
    /// removed (when there is one).
    Committed = 12,
}

impl Step {
    /// "connecting", "creating the certificate", ... for messages.
    pub fn doing(self) -> &'static str {
        match self {
            Step::Connecting => "connecting",
            Step::Subscribing => "subscribing to the reply topics",
            Step::Subscribed => "subscribed",
            Step::CreatingCertificate => "creating the certificate",
            Step::CertificateCreated => "certificate created",
            Step::Registering => "registering the thing",
            Step::Registered => "registered",
            Step::Verifying => "connecting with the new certificate",
            Step::Verified => "verified",
            Step::Resuming => "resuming from the journal",
            Step::Restarting => "starting over with a new certificate",
            Step::Retrying => "waiting to retry",
            Step::Committed => "committed the credentials",
        }
    }
}
