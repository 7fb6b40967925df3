//! The resume journal's parser (the file a crashed or interrupted flow resumes from). Input:
//! the file's bytes.
//!
//! Invariants: no panic; a parsed journal has a certificate, a token and, if any, a PEM key;
//! a refusal is one of the parser's fixed sentences, so it never quotes the file (its token or
//! key).

#![no_main]

use fleetprov::Secret;
use fleetprov::store::journal;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match journal::parse(data) {
        Ok(entry) => {
            let c = &entry.certificate;
            assert!(!c.certificate_id.is_empty());
            assert!(c.certificate_pem.contains("BEGIN CERTIFICATE"));
            assert!(!c.ownership_token.is_empty());
            assert!(c.private_key.is_none());
            if let Some(k) = &entry.private_key {
                assert!(k.expose().contains("PRIVATE KEY-----"));
            }
            // Validity arithmetic on whatever times the file holds.
            for now in [0, entry.created_unix, u64::MAX] {
                let _ = entry.token_valid(now, 60);
                let _ = entry.token_valid(now, u64::MAX);
            }
            // Debug output hides the secrets: it is the same with other secrets of their size.
            let mut other = entry.clone();
            let same_size = |s: &str| Secret::new("x".repeat(s.len()));
            other.certificate.ownership_token = same_size(c.ownership_token.expose());
            other.private_key = entry.private_key.as_ref().map(|k| same_size(k.expose()));
            assert_eq!(
                format!("{entry:?}"),
                format!("{other:?}"),
                "Debug shows a secret"
            );
        }
        Err(reason) => assert!(known_shape(&reason), "a refusal quotes the file: {reason}"),
    }
});

/// Refusals are fixed sentences with numbers: nothing from the file's strings can appear.
fn known_shape(reason: &str) -> bool {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if let Some(rest) = reason.strip_prefix("not a journal: ") {
        return rest
            .split_once(" error at line ")
            .is_some_and(|(kind, line)| {
                ["Io", "Syntax", "Data", "Eof"].contains(&kind) && digits(line)
            });
    }
    if let Some(rest) = reason.strip_prefix("version ") {
        return rest
            .split_once(" is not ")
            .is_some_and(|(a, b)| digits(a) && digits(b));
    }
    [
        "no certificate",
        "no ownership token",
        "the private key is not PEM",
    ]
    .contains(&reason)
}
