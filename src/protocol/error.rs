//! Rejections by the service.

use std::fmt;

/// A request rejected by AWS IoT (or the emulator): the `/rejected` payload, intact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceError {
    /// HTTP-like status: 400, 403, 404, 429, 500, ...
    pub status_code: u16,
    /// e.g. `InvalidCertificateOwnershipToken`.
    pub error_code: String,
    /// The service's message.
    pub error_message: String,
}

impl ServiceError {
    /// Whether retrying the same request can help: throttling (429) and server errors (5xx).
    pub fn is_retryable(&self) -> bool {
        self.status_code == 429 || (500..600).contains(&self.status_code)
    }
}

impl fmt::Display for ServiceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rejected with {} {}: {}",
            self.status_code, self.error_code, self.error_message
        )
    }
}

impl std::error::Error for ServiceError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryable_statuses() {
        for (status, retry) in [
            (400, false),
            (403, false),
            (404, false),
            (409, false),
            (429, true),
            (500, true),
            (503, true),
            (599, true),
            (600, false),
        ] {
            let e = ServiceError {
                status_code: status,
                error_code: "X".into(),
                error_message: "m".into(),
            };
            assert_eq!(e.is_retryable(), retry, "{status}");
        }
    }
}
