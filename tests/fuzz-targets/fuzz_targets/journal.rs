//! The resume journal's parser (the file a crashed or interrupted flow resumes from). Input:
//! the file's bytes.
//!
//! Invariants: no panic; a parsed journal has a certificate, a token and, if any, a PEM key;
//! a refusal names what is wrong and never quotes the token or the key.

#![no_main]

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
            // Debug output hides the secrets.
            let shown = format!("{entry:?}");
            let token = c.ownership_token.expose();
            if token.len() >= 8 {
                assert!(!shown.contains(token), "Debug shows the token");
            }
        }
        Err(reason) => {
            assert!(!reason.is_empty());
            // Secrets of a file that almost parsed must not appear in the reason.
            if let Ok(serde_json::Value::Object(map)) =
                serde_json::from_slice::<serde_json::Value>(data)
            {
                for field in ["ownership_token", "private_key_pem"] {
                    if let Some(serde_json::Value::String(s)) = map.get(field)
                        && s.len() >= 8
                    {
                        assert!(!reason.contains(s.as_str()), "{reason}");
                    }
                }
            }
        }
    }
});
