//! Codec micro-benchmarks: `fleetprov::protocol`'s request encoders and reply decoders, in JSON
//! and CBOR, on payloads captured from the emulator (`tests/bench/fixtures/codec.json`).
//!
//! ```sh
//! cargo bench --bench codec
//! ```
//!
//! No harness (no criterion: the tree stays lean and quick to build): each case runs for about
//! `FLEETPROV_CODEC_MS` milliseconds (default 200) after a short warm-up, in rounds; the figure
//! is the median round's nanoseconds per operation. Prints one line of JSON per case.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use fleetprov::protocol::{
    decode_certificate_reply, decode_register_reply, decode_rejection, encode_create_keys_request,
    encode_csr_request, encode_register_request, Api, Format,
};
use fleetprov::Secret;
use serde_json::Value;

const FIXTURES: &str = include_str!("fixtures/codec.json");
const ROUNDS: usize = 15;

/// A case: its name, the payload size in bytes, and the operation.
type Case = (&'static str, usize, Box<dyn FnMut()>);

/// Median ns/op of `f` over ROUNDS rounds that together take about `budget`.
fn measure(budget: Duration, mut f: impl FnMut()) -> (f64, u64) {
    // Calibrate: how many calls fill a round.
    let round = budget / ROUNDS as u32;
    let mut per_round: u64 = 1;
    loop {
        let t = Instant::now();
        for _ in 0..per_round {
            f();
        }
        if t.elapsed() >= round / 4 || per_round >= 1 << 30 {
            let spent = t.elapsed().as_nanos().max(1) as f64;
            per_round = ((per_round as f64) * (round.as_nanos() as f64) / spent).ceil() as u64;
            break;
        }
        per_round *= 4;
    }
    let per_round = per_round.max(1);
    let mut samples: Vec<f64> = (0..ROUNDS)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..per_round {
                f();
            }
            t.elapsed().as_nanos() as f64 / per_round as f64
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    (samples[ROUNDS / 2], per_round * ROUNDS as u64)
}

fn to_format(format: Format, v: &Value) -> Vec<u8> {
    match format {
        Format::Json => serde_json::to_vec(v).expect("JSON"),
        Format::Cbor => {
            let mut out = Vec::new();
            ciborium::ser::into_writer(v, &mut out).expect("CBOR");
            out
        }
    }
}

fn main() {
    let budget = Duration::from_millis(
        std::env::var("FLEETPROV_CODEC_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(200),
    );
    let fx: Value = serde_json::from_str(FIXTURES).expect("fixtures/codec.json");
    let text = |k: &str| fx[k].as_str().expect(k).to_owned();
    let csr_pem = text("csr_pem");
    let token = Secret::new(
        fx["csr_reply"]["certificateOwnershipToken"]
            .as_str()
            .expect("token")
            .to_owned(),
    );
    let parameters: BTreeMap<String, String> =
        serde_json::from_value(fx["register_parameters"].clone()).expect("parameters");
    let csr_api = Api::CreateCertificateFromCsr;
    let keys_api = Api::CreateKeysAndCertificate;
    let register_api = Api::RegisterThing {
        template: "DemoTemplate".into(),
    };

    for format in [Format::Json, Format::Cbor] {
        let csr_reply = to_format(format, &fx["csr_reply"]);
        let keys_reply = to_format(format, &fx["keys_reply"]);
        let register_reply = to_format(format, &fx["register_reply"]);
        let rejection = to_format(format, &fx["rejection"]);
        // Each case checks its result once before it is timed.
        assert!(decode_certificate_reply(&csr_api, format, &csr_reply).is_ok());
        assert!(decode_certificate_reply(&keys_api, format, &keys_reply)
            .is_ok_and(|c| c.private_key.is_some()));
        assert!(
            decode_register_reply(format, &register_reply).is_ok_and(|r| r.thing_name.is_some())
        );
        assert!(
            decode_rejection(&register_api, format, &rejection).is_ok_and(|e| e.status_code == 404)
        );

        let mut cases: Vec<Case> = vec![
            (
                "encode CreateKeysAndCertificate request",
                encode_create_keys_request(format).len(),
                Box::new(move || {
                    black_box(encode_create_keys_request(black_box(format)));
                }),
            ),
            (
                "encode CreateCertificateFromCsr request",
                encode_csr_request(format, &csr_pem).len(),
                Box::new({
                    let csr_pem = csr_pem.clone();
                    move || {
                        black_box(encode_csr_request(black_box(format), black_box(&csr_pem)));
                    }
                }),
            ),
            (
                "encode RegisterThing request",
                encode_register_request(format, &token, &parameters).len(),
                Box::new({
                    let (token, parameters) = (token.clone(), parameters.clone());
                    move || {
                        black_box(encode_register_request(
                            black_box(format),
                            black_box(&token),
                            black_box(&parameters),
                        ));
                    }
                }),
            ),
            (
                "decode CreateCertificateFromCsr accepted",
                csr_reply.len(),
                Box::new({
                    let (api, payload) = (csr_api.clone(), csr_reply);
                    move || {
                        let _ =
                            black_box(decode_certificate_reply(&api, format, black_box(&payload)));
                    }
                }),
            ),
            (
                "decode CreateKeysAndCertificate accepted",
                keys_reply.len(),
                Box::new({
                    let (api, payload) = (keys_api.clone(), keys_reply);
                    move || {
                        let _ =
                            black_box(decode_certificate_reply(&api, format, black_box(&payload)));
                    }
                }),
            ),
            (
                "decode RegisterThing accepted",
                register_reply.len(),
                Box::new(move || {
                    let _ = black_box(decode_register_reply(format, black_box(&register_reply)));
                }),
            ),
            (
                "decode RegisterThing rejected",
                rejection.len(),
                Box::new({
                    let api = register_api.clone();
                    move || {
                        let _ = black_box(decode_rejection(&api, format, black_box(&rejection)));
                    }
                }),
            ),
        ];
        for (name, bytes, f) in cases.iter_mut() {
            let (ns, iterations) = measure(budget, f);
            println!(
                "{{\"case\": \"{name}\", \"format\": \"{format}\", \"bytes\": {bytes}, \
                 \"ns_per_op\": {ns:.1}, \"iterations\": {iterations}}}"
            );
        }
    }
}
