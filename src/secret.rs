//! Secrets: private key PEM and ownership tokens.

use zeroize::Zeroizing;

/// A secret string, wiped from memory on drop (clones too). Its `Debug` shows only its length;
/// it has no `Display`, so it cannot end up in a message by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Zeroizing<String>);

impl Secret {
    pub fn new(s: String) -> Secret {
        Secret(Zeroizing::new(s))
    }

    /// The secret text, for the few places that must use it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

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

    #[test]
    fn debug_is_redacted() {
        let s = Secret::new("-----BEGIN PRIVATE KEY-----abc".into());
        let text = format!("{s:?} {:?}", Some(s.clone()));
        assert!(!text.contains("PRIVATE"), "{text}");
        assert!(text.contains("30 bytes"));
        assert_eq!(s.clone(), s);
        assert_eq!(s.len(), 30);
        assert!(!s.is_empty());
    }
}
