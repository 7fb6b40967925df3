//! The reply decoders (accepted and rejected replies of the three APIs, JSON and CBOR) and the
//! reply-topic classification. Layout: `fleetprov_fuzz::decoders`.
//!
//! Invariants: no panic; a decoded certificate reply holds what the flow relies on; a value
//! decodes the same (accepted or refused, same fields) in JSON and in CBOR; a topic is the
//! accepted or rejected reply of an API exactly when it equals that topic.

#![no_main]

use fleetprov::protocol::{
    Api, Format, decode_certificate_reply, decode_register_reply, decode_rejection,
};
use fleetprov_fuzz::{apis, decoders, encode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let apis = apis();
    let api = &apis[usize::from(selector & 3).min(2)];
    let format = if selector & decoders::CBOR != 0 {
        Format::Cbor
    } else {
        Format::Json
    };
    if selector & decoders::TOPIC != 0 {
        let Ok(topic) = std::str::from_utf8(rest) else {
            return;
        };
        for api in &apis {
            for format in [Format::Json, Format::Cbor] {
                let want = if topic == api.accepted_topic(format) {
                    Some(true)
                } else if topic == api.rejected_topic(format) {
                    Some(false)
                } else {
                    None
                };
                assert_eq!(api.classify_reply(format, topic), want, "{topic:?}");
            }
        }
        return;
    }
    decode(api, format, rest);
    // The same value decodes the same from JSON and from CBOR. (Re-encoded from one parsed
    // value: serde_json keeps the last of duplicate keys, which the decoders refuse.)
    if format == Format::Json
        && let Ok(value) = serde_json::from_slice::<serde_json::Value>(rest)
    {
        let json = decode(api, Format::Json, &encode(Format::Json, &value));
        let cbor = decode(api, Format::Cbor, &encode(Format::Cbor, &value));
        assert_eq!(json, cbor, "JSON and CBOR disagree on {value}");
    }
});

/// Each decoder's outcome, with the decoded values (Ok) or only that it failed (Err: the
/// messages name the format).
fn decode(api: &Api, format: Format, payload: &[u8]) -> [Option<String>; 2] {
    let rejection = decode_rejection(api, format, payload)
        .ok()
        .map(|e| format!("{} {} {}", e.status_code, e.error_code, e.error_message));
    let accepted = match api {
        Api::RegisterThing { .. } => decode_register_reply(format, payload)
            .ok()
            .map(|r| format!("{:?} {:?}", r.thing_name, r.device_configuration)),
        _ => decode_certificate_reply(api, format, payload)
            .ok()
            .map(|c| {
                assert!(!c.certificate_id.is_empty());
                assert!(c.certificate_id.bytes().all(|b| b.is_ascii_alphanumeric()));
                assert!(c.certificate_pem.contains("-----BEGIN CERTIFICATE-----"));
                assert!(!c.ownership_token.is_empty());
                assert_eq!(
                    c.private_key.is_some(),
                    *api == Api::CreateKeysAndCertificate
                );
                if let Some(k) = &c.private_key {
                    assert!(k.expose().contains("PRIVATE KEY-----"));
                }
                format!(
                    "{} {} {} {:?}",
                    c.certificate_id,
                    c.certificate_pem,
                    c.ownership_token.expose(),
                    c.private_key.as_ref().map(|k| k.expose().to_owned())
                )
            }),
    };
    [rejection, accepted]
}
