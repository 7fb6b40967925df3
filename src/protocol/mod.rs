//! The fleet provisioning MQTT API: topics, payloads in JSON and CBOR, and service errors.

pub mod codec;
pub mod error;
pub mod reason;
pub mod step;
pub mod topics;

pub use codec::{
    decode_certificate_reply, decode_register_reply, decode_rejection, encode_create_keys_request,
    encode_csr_request, encode_register_request, CreatedCertificate, DecodeError, Registered,
};
pub use error::ServiceError;
pub use reason::{MqttPacket, MqttRefusal};
pub use step::Step;
pub use topics::{validate_template_name, Api, Format};
