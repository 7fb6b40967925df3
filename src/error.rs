//! The library's error type: every failure, typed.

use std::fmt;

use crate::protocol::{DecodeError, MqttRefusal, ServiceError, Step};

/// Why an operation failed. Texts never contain private keys or ownership tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// A caller-supplied value is unusable (bad template name, empty PEM, ...).
    InvalidArgument(String),
    /// TLS could not be set up or the handshake failed (bad CA, certificate refused, ...).
    Tls(String),
    /// The connection could not be made or was lost.
    Connection(String),
    /// The broker answered with an MQTT reason code that ends the connection or the request:
    /// a CONNACK refusing the connection, a DISCONNECT (MQTT 5), or a PUBACK refusing a
    /// request (MQTT 5). Retryable when the code says the server is busy, unavailable or
    /// rate-limiting, not when it refuses the request itself (not authorized, ...).
    Refused(MqttRefusal),
    /// A step took longer than the per-step timeout.
    Timeout(Step),
    /// The overall deadline passed.
    Deadline(Step),
    /// The service rejected a request; its fields are intact.
    Rejected {
        api: &'static str,
        error: ServiceError,
    },
    /// A reply that does not match the API.
    MalformedReply(DecodeError),
    /// The broker refused a subscription the flow needs.
    SubscribeFailed(String),
    /// The returned certificate is not for the device's key.
    CertificateMismatch,
    /// The operation was cancelled by the caller.
    Cancelled,
    /// A key behind a signing function (a secure element, TPM or HSM: the claim key, or the
    /// device key) could not sign: the function reported a failure (a token that refuses, a
    /// session logged out), or returned a signature that does not verify with the key's
    /// certificate or public key. Nothing was sent with it. Not retryable.
    Signer(String),
    /// Writing the credentials failed.
    Storage(String),
    /// Another operation is running on the same client.
    Busy,
    /// Something inside the library failed that the caller cannot fix by changing its input: a
    /// thread or runtime that could not start, a key that could not be generated, a state the
    /// library did not expect. Not retryable.
    Internal(String),
    /// A bug: the library panicked; the operation did not complete.
    Panicked,
    /// A call that must not be made from inside a callback of the library (a blocking call,
    /// which would wait for the thread the callback runs on) was made from one.
    InCallback(&'static str),
}

impl Error {
    /// The error with `note` added to its text, for the kinds whose text describes a
    /// connection (the others are returned unchanged).
    pub fn noted(self, note: &str) -> Error {
        match self {
            Error::Connection(m) => Error::Connection(format!("{m} {note}")),
            Error::Tls(m) => Error::Tls(format!("{m} {note}")),
            Error::Refused(mut r) => {
                r.note = if r.note.is_empty() {
                    note.to_owned()
                } else {
                    format!("{} {note}", r.note)
                };
                Error::Refused(r)
            }
            other => other,
        }
    }

    /// Whether trying again can help: connection trouble, timeouts, 429 and 5xx rejections.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Connection(_) | Error::Timeout(_) => true,
            Error::Refused(r) => r.is_retryable(),
            Error::Rejected { error, .. } => error.is_retryable(),
            _ => false,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidArgument(m) => write!(f, "invalid argument: {m}"),
            Error::Tls(m) => write!(f, "TLS: {m}"),
            Error::Connection(m) => write!(f, "connection: {m}"),
            Error::Refused(r) => write!(f, "connection: {r}"),
            Error::Timeout(step) => write!(f, "timed out while {}", step.doing()),
            Error::Deadline(step) => write!(f, "overall deadline passed while {}", step.doing()),
            Error::Rejected { api, error } => write!(f, "{api} {error}"),
            Error::MalformedReply(e) => write!(f, "{e}"),
            Error::SubscribeFailed(topic) => {
                write!(f, "the broker refused the subscription to {topic}")
            }
            Error::CertificateMismatch => {
                f.write_str("the returned certificate does not match the device's private key")
            }
            Error::Cancelled => f.write_str("cancelled"),
            Error::Signer(m) => write!(f, "signer: {m}"),
            Error::Storage(m) => write!(f, "storing credentials: {m}"),
            Error::Busy => f.write_str("another operation is running on this client"),
            Error::Internal(m) => write!(f, "internal error: {m}"),
            Error::Panicked => f.write_str("internal error: the library panicked"),
            Error::InCallback(what) => write!(
                f,
                "{what} must not be called from inside a fleetprov callback: call it after the callback returned"
            ),
        }
    }
}

impl std::error::Error for Error {}

impl From<crate::keys::KeyError> for Error {
    fn from(e: crate::keys::KeyError) -> Self {
        match e {
            crate::keys::KeyError::Mismatch => Error::CertificateMismatch,
            crate::keys::KeyError::Signer(m) => Error::Signer(m),
            crate::keys::KeyError::Generation(m) => {
                Error::Internal(format!("key generation failed: {m}"))
            }
            other => Error::InvalidArgument(other.to_string()),
        }
    }
}
