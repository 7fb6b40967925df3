//! Shared by the fuzz targets and the seed writer: the byte layouts the targets decode their
//! input from, the writers that build seed inputs in the same layouts, and valid service replies.

use std::sync::OnceLock;

use fleetprov::protocol::{Api, Format};
use serde_json::{Value, json};

/// The template every host flow registers through.
pub const TEMPLATE: &str = "FuzzTemplate";

/// A device certificate and the key it was issued for (self-signed P-256, made once per
/// process), and a CSR for the same key (the external-CSR method).
pub struct Material {
    pub certificate_pem: String,
    pub private_key_pem: String,
    pub certificate_id: String,
    pub csr_pem: String,
    /// The ownership token of the replies built here: different in each process, so a fuzz
    /// input cannot easily carry it elsewhere (a log line must never show it).
    pub token: String,
}

pub fn material() -> &'static Material {
    static M: OnceLock<Material> = OnceLock::new();
    M.get_or_init(|| {
        let key = rcgen::KeyPair::generate().expect("P-256 key");
        let params = rcgen::CertificateParams::new(vec!["fuzz-device".to_string()])
            .expect("certificate parameters");
        let certificate_pem = params.self_signed(&key).expect("certificate").pem();
        let csr_pem = params
            .serialize_request(&key)
            .and_then(|csr| csr.pem())
            .expect("CSR");
        let certificate_id =
            fleetprov::keys::certificate_id(&certificate_pem).expect("certificate id");
        Material {
            token: format!("token-{}", &certificate_id[..24]),
            certificate_pem,
            private_key_pem: key.serialize_pem(),
            certificate_id,
            csr_pem,
        }
    })
}

pub fn encode(format: Format, value: &Value) -> Vec<u8> {
    match format {
        Format::Json => serde_json::to_vec(value).expect("JSON"),
        Format::Cbor => {
            let mut out = Vec::new();
            ciborium::ser::into_writer(value, &mut out).expect("CBOR");
            out
        }
    }
}

/// The accepted reply of CreateKeysAndCertificate (`with_key`) or CreateCertificateFromCsr.
pub fn certificate_reply(with_key: bool) -> Value {
    let m = material();
    let mut v = json!({
        "certificateId": m.certificate_id,
        "certificatePem": m.certificate_pem,
        "certificateOwnershipToken": m.token,
    });
    if with_key {
        v["privateKey"] = json!(m.private_key_pem);
    }
    v
}

pub fn register_reply(thing_name: &str) -> Value {
    json!({"thingName": thing_name, "deviceConfiguration": {"fleet": "fuzz", "mode": "test"}})
}

pub fn rejection(status: u16, code: &str) -> Value {
    json!({"statusCode": status, "errorCode": code, "errorMessage": "refused by the fuzzer"})
}

/// The three APIs, in the order the layouts below number them.
pub fn apis() -> [Api; 3] {
    [
        Api::CreateKeysAndCertificate,
        Api::CreateCertificateFromCsr,
        Api::RegisterThing {
            template: TEMPLATE.to_string(),
        },
    ]
}

/// Reads a fuzz input front to back; past its end every read gives zeros.
pub struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Reader { data }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn peek(&self) -> u8 {
        self.data.first().copied().unwrap_or(0)
    }

    pub fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((b, rest)) => {
                self.data = rest;
                *b
            }
            None => 0,
        }
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.u8(), self.u8()])
    }

    pub fn bytes(&mut self, len: usize) -> &'a [u8] {
        let (head, rest) = self.data.split_at(len.min(self.data.len()));
        self.data = rest;
        head
    }

    /// A u16 length, then that many bytes.
    pub fn blob(&mut self) -> &'a [u8] {
        let len = usize::from(self.u16());
        self.bytes(len)
    }

    /// A u8 length, then that many bytes.
    pub fn short(&mut self) -> &'a [u8] {
        let len = usize::from(self.u8());
        self.bytes(len)
    }
}

/// Layout of the `decoders` target's input: one selector byte, then the payload.
///
/// selector bits 0-1: the API (0 CreateKeysAndCertificate, 1 CreateCertificateFromCsr,
/// 2 and 3 RegisterThing); bit 2: CBOR instead of JSON; bit 3: the rest is a topic to classify
/// instead of a payload to decode.
pub mod decoders {
    pub const CBOR: u8 = 4;
    pub const TOPIC: u8 = 8;
}

/// Layout of the `host` target's input: a setup block, then events until the input ends.
pub mod host {
    /// Setup, 6 bytes.
    /// 0: bit 0 CBOR; bits 1-2 method (0 and 3 CreateKeysAndCertificate, 1 external CSR, 2 CSR
    ///    with a key made on the device); bit 3 verify; bit 4 log and progress callbacks; bit 5 a
    ///    template parameter; bit 6 auto: callbacks without an instruction answer like a
    ///    well-behaved broker and service (connect -> connected, subscribe -> SUBACK granted,
    ///    publish -> the accepted reply).
    /// 1: max attempts, 1 + b % 4.   2: step timeout, 100 + 20 b ms.
    /// 3: overall timeout, 1000 + 100 b ms.   4: initial backoff, 25 + b ms (max: 4 times it).
    /// 5: start time, 1000 b ms.
    pub const SETUP_LEN: usize = 6;
    pub const S_CBOR: u8 = 1;
    pub const S_METHOD_CREATE_KEYS: u8 = 0;
    pub const S_METHOD_EXTERNAL_CSR: u8 = 1 << 1;
    pub const S_METHOD_CSR: u8 = 2 << 1;
    pub const S_VERIFY: u8 = 1 << 3;
    pub const S_HOOKS: u8 = 1 << 4;
    pub const S_PARAMETER: u8 = 1 << 5;
    pub const S_AUTO: u8 = 1 << 6;

    /// Events: one opcode byte (taken modulo [`OPS`]) and its arguments.
    pub const START: u8 = 0;
    pub const CONNECTED: u8 = 1;
    /// Argument: one byte, bit 0: a TLS failure.
    pub const CONNECT_FAILED: u8 = 2;
    /// Arguments: a count byte (modulo 8), then that many return codes.
    pub const SUBACK: u8 = 3;
    /// Arguments: a topic selector, then a body (see [`T_`] and [`B_`] constants).
    pub const MESSAGE: u8 = 4;
    pub const DISCONNECTED: u8 = 5;
    pub const TICK: u8 = 6;
    /// Ticks at fleetprov_host_wake_at() (or now, if that is earlier).
    pub const TICK_AT_WAKE: u8 = 7;
    /// Asks fleetprov_host_result().
    pub const RESULT: u8 = 8;
    /// Argument: one byte, the clock advances that many ms.
    pub const ADVANCE: u8 = 9;
    /// Argument: u16, the clock advances that many ms.
    pub const ADVANCE_LONG: u8 = 10;
    /// Argument: one byte, the clock goes back 10 times that many ms (a misbehaving host).
    pub const BACK: u8 = 11;
    /// Argument: one byte, an instruction for the next callback without one (see [`D_`]).
    pub const DIRECTIVE: u8 = 12;
    pub const OPS: u8 = 13;

    /// Topic selector: t % 8 below 6: the reply topics, API (t % 8) / 2 (see `apis()`),
    /// accepted when even; bit 3: in the other format than the flow's. 6 and 7: a u8 length and
    /// that many raw bytes (given with their length: a NUL inside or bytes that are not UTF-8
    /// make a topic of no interest, not an error).
    pub const T_RAW: u8 = 6;
    pub const T_OTHER_FORMAT: u8 = 8;

    /// Body: one kind byte (modulo 5). B_RAW: u16 length and bytes. B_CERTIFICATE: the accepted
    /// certificate reply; argument byte bit 0: with the private key. B_REGISTERED: a u8 length
    /// and a thing name. B_REJECTED: u16 status, then an error code selector byte (0 the token
    /// refusal, 1 Throttling, 2 InternalFailure, else "Fuzz").
    pub const B_RAW: u8 = 0;
    pub const B_CERTIFICATE: u8 = 1;
    pub const B_REGISTERED: u8 = 2;
    pub const B_REJECTED: u8 = 3;
    pub const B_EMPTY: u8 = 4;
    pub const B_KINDS: u8 = 5;

    /// Callback instruction: bits 0-1 the return value (0 and 1: 0; 2: -1; 3: 7); bits 2-5
    /// what the callback does first (the D_ constants).
    pub const D_FAIL: u8 = 2;
    pub const D_NOTHING: u8 = 0;
    pub const D_CONNECTED: u8 = 1 << 2;
    pub const D_CONNECT_FAILED: u8 = 2 << 2;
    pub const D_SUBACK_GRANTED: u8 = 3 << 2;
    pub const D_SUBACK_REFUSED: u8 = 4 << 2;
    pub const D_REPLY_ACCEPTED: u8 = 5 << 2;
    pub const D_REPLY_REJECTED: u8 = 6 << 2;
    pub const D_DISCONNECTED: u8 = 7 << 2;
    pub const D_TICK: u8 = 8 << 2;
    pub const D_RESULT: u8 = 9 << 2;
    pub const D_WAKE_AT: u8 = 10 << 2;
    pub const D_FREE: u8 = 11 << 2;
    pub const D_TICK_LATE: u8 = 12 << 2;
    pub const D_REPLY_TOKEN_REFUSED: u8 = 13 << 2;
    pub const D_CONNECT_FAILED_TLS: u8 = 14 << 2;

    /// Builds a `host` input.
    #[derive(Default)]
    pub struct Writer(pub Vec<u8>);

    impl Writer {
        pub fn setup(flags: u8, attempts: u8, step: u8, overall: u8, backoff: u8) -> Self {
            Writer(vec![flags, attempts, step, overall, backoff, 0])
        }
        pub fn op(&mut self, op: u8) -> &mut Self {
            self.0.push(op);
            self
        }
        pub fn byte(&mut self, b: u8) -> &mut Self {
            self.0.push(b);
            self
        }
        pub fn u16(&mut self, v: u16) -> &mut Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        pub fn blob(&mut self, bytes: &[u8]) -> &mut Self {
            self.u16(u16::try_from(bytes.len()).expect("blob under 64 KiB"));
            self.0.extend_from_slice(bytes);
            self
        }
        pub fn advance(&mut self, ms: u8) -> &mut Self {
            self.op(ADVANCE).byte(ms)
        }
        /// A message on reply topic `topic` (a selector) with the certificate reply built by
        /// the target (its process's certificate: the one its external CSR is for).
        pub fn message_certificate(&mut self, topic: u8, with_key: bool) -> &mut Self {
            self.op(MESSAGE)
                .byte(topic)
                .byte(B_CERTIFICATE)
                .byte(u8::from(with_key))
        }
        /// A message on reply topic `topic` (a selector) with a raw body.
        pub fn message_raw(&mut self, topic: u8, body: &[u8]) -> &mut Self {
            self.op(MESSAGE).byte(topic).byte(B_RAW).blob(body)
        }
    }
}
