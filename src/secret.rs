//! Secrets: private key PEM and ownership tokens.

use zeroize::Zeroizing;

/// A secret string (a private key PEM or an ownership token), wiped from memory on drop.
///
/// Clones are wiped on drop too. `Debug` shows only the length; there is no `Display` and no
/// `Serialize`, so a secret cannot end up in a message, a log line or a JSON document by
/// accident: the few places that need the text call [`Secret::expose`].
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Zeroizing<String>);

impl Secret {
    /// Takes ownership of `s`; its buffer is the one wiped on drop.
    pub fn new(s: String) -> Secret {
        Secret(Zeroizing::new(s))
    }

    /// The secret text, for the few places that must use it. Do not copy it into an ordinary
    /// `String` that outlives the call: that copy would not be wiped.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The length of the secret in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the secret is the empty string.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Secret {
        Secret::new(s)
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret(<redacted, {} bytes>)", self.0.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEG\n";

    #[test]
    fn debug_is_redacted() {
        let s = Secret::new(KEY.to_string());
        let shown = format!("Secret(<redacted, {} bytes>)", KEY.len());
        assert_eq!(format!("{s:?}"), shown);
        for text in [
            format!("{s:?}"),
            format!("{s:#?}"),
            format!("{:?}", Some(s.clone())),
            format!("{:?}", vec![s.clone()]),
        ] {
            assert!(!text.contains("PRIVATE"), "{text}");
            assert!(!text.contains("MIGH"), "{text}");
            assert!(text.contains(&shown), "{text}");
        }
    }

    #[test]
    fn clone_equality_and_length() {
        let s = Secret::from(KEY.to_string());
        let c = s.clone();
        assert_eq!(c, s);
        assert_eq!(c.expose(), KEY);
        assert_ne!(s, Secret::new("other".into()));
        assert_eq!(s.len(), KEY.len());
        assert!(!s.is_empty());
        let empty = Secret::new(String::new());
        assert!(empty.is_empty());
        assert_eq!(empty.len(), 0);
        assert_eq!(format!("{empty:?}"), "Secret(<redacted, 0 bytes>)");
        // Multi-byte text: the length is in bytes.
        assert_eq!(Secret::new("é".into()).len(), 2);
    }
}
