//! The three APIs in both formats over both MQTT versions, then the device reconnects with its
//! new certificate and uses its own topics.

use fleetprov_emulator::wire::{Packet, Version};
use fleetprov_emulator::Format;
use serde_json::json;

mod common;
use common::*;

async fn provision_and_reconnect(env: &Env, version: Version, api: CertApi, format: Format) {
    let serial = format!("{version:?}-{api:?}-{format:?}");
    let p = provision(env, version, api, format, &serial).await;
    assert_eq!(p.thing_name, format!("demo-{serial}"));
    assert_eq!(p.certificate_id.len(), 64);
    let der = rustls::pki_types::CertificateDer::from(
        rustls::pki_types::pem::PemObject::from_pem_slice(p.certificate_pem.as_bytes())
            .map(|c: rustls::pki_types::CertificateDer<'static>| c.to_vec())
            .unwrap(),
    );
    assert_eq!(fleetprov_emulator::certificate_id(&der), p.certificate_id);
    assert!(p.device_configuration.is_object());
    let cert = env
        .certificate(&p.certificate_id)
        .expect("certificate registered");
    assert_eq!(cert["status"], "ACTIVE");
    let thing = env.thing(&p.thing_name).expect("thing created");
    assert_eq!(thing["attributes"]["serial"], json!(serial));
    assert_eq!(thing["certificates"], json!([p.certificate_id]));

    // The device reconnects as itself and talks on its own topics.
    let mut dev = Client::connect(env, &p.certificate_pem, &p.key_pem, version, &p.thing_name)
        .await
        .expect("new certificate connects");
    let base = format!("devices/{}", p.thing_name);
    assert_eq!(
        dev.subscribe(&[(&format!("{base}/#"), 1), (&format!("{base}/+/state"), 0)])
            .await,
        vec![Ok(1), Ok(0)]
    );
    dev.publish(&format!("{base}/hello"), &b"hi"[..], 1).await;
    let (topic, body) = dev.next_publish().await;
    assert_eq!(
        (topic.as_str(), &body[..]),
        (format!("{base}/hello").as_str(), &b"hi"[..])
    );
    dev.publish(&format!("{base}/lamp/state"), &b"on"[..], 0)
        .await;
    match dev.next().await {
        Packet::Publish { topic, qos, .. } => {
            assert_eq!((topic, qos), (format!("{base}/lamp/state"), 0));
        }
        other => panic!("expected the message, got {other:?}"),
    }
    // Overlapping filters deliver once, at the highest granted QoS: the next packet after it
    // answers a ping sent later.
    dev.send(&Packet::PingReq).await;
    assert_eq!(dev.recv(WAIT).await, Recv::Packet(Packet::PingResp));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_api_format_and_version() {
    let env = Env::start();
    for version in [Version::V4, Version::V5] {
        for api in [CertApi::Keys, CertApi::Csr] {
            for format in [Format::Json, Format::Cbor] {
                provision_and_reconnect(&env, version, api, format).await;
            }
        }
    }
    let registry = env.emu.registry().unwrap();
    assert_eq!(registry["things"].as_array().unwrap().len(), 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsa_keys_like_aws() {
    let env = Env::start_with(|c| c.key_kind = fleetprov_emulator::KeyKind::Rsa2048);
    let mut client = env.claim_client(Version::V4, "rsa").await;
    let (_, _, key, _) = create_certificate(&mut client, CertApi::Keys, Format::Json).await;
    assert!(
        key.starts_with("-----BEGIN RSA PRIVATE KEY-----"),
        "PKCS#1 like AWS"
    );
    provision_and_reconnect(&env, Version::V5, CertApi::Keys, Format::Cbor).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_object_and_extra_keys_are_accepted_by_create_keys() {
    let env = Env::start();
    let mut c = env.claim_client(Version::V4, "keys-shapes").await;
    let topic = keys_topic(Format::Json);
    let (ok, _) = c.request(&topic, Format::Json, b"{}").await;
    assert!(ok);
    let (ok, _) = c
        .request_subscribed(&topic, Format::Json, br#"{"extra": 1}"#)
        .await;
    assert!(ok);
    let topic = keys_topic(Format::Cbor);
    let (ok, _) = c.request(&topic, Format::Cbor, &[0xa0]).await;
    assert!(ok, "empty CBOR map");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_goes_only_to_the_requesting_connection() {
    let env = Env::start();
    let mut asker = env.claim_client(Version::V4, "asker").await;
    let mut other = env.claim_client(Version::V5, "other").await;
    let topic = keys_topic(Format::Json);
    other
        .subscribe(&[
            (&format!("{topic}/accepted"), 1),
            ("$aws/certificates/#", 1),
        ])
        .await;
    let (ok, _) = asker.request(&topic, Format::Json, b"").await;
    assert!(ok);
    // `other` sees nothing; prove it by a ping round trip after the reply was sent.
    other.send(&Packet::PingReq).await;
    assert_eq!(other.recv(WAIT).await, Recv::Packet(Packet::PingResp));
}
