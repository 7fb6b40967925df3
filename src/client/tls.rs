//! rustls client configuration with the ring provider (never a process-wide default provider:
//! the library lives in someone else's process).

#[cfg(feature = "transport")]
use {
    crate::error::Error,
    crate::keys::{self, remote::RemoteKey},
    crate::secret::Secret,
    rustls::pki_types::{CertificateDer, PrivateKeyDer},
    std::sync::Arc,
};

/// ALPN protocol AWS IoT requires for MQTT on port 443.
pub const ALPN_MQTT: &[u8] = b"x-amzn-mqtt-ca";

/// Whether this build can load the operating system's root certificates (cargo feature
/// `system-roots`, on by default).
pub const SYSTEM_ROOTS: bool = cfg!(feature = "system-roots");

/// Why the system roots cannot be used in a build without them.
pub const NO_SYSTEM_ROOTS: &str = "this build of the library has no access to the system's root \
     certificates (built without the cargo feature `system-roots`): give the CA certificate \
     (a CA file)";

/// Which roots authenticate the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Roots {
    /// PEM CA certificates (file content or in memory).
    Pem(String),
    /// The operating system's trust store.
    System,
}

/// The credentials a TLS connection authenticates the client with.
#[cfg(feature = "transport")]
#[derive(Clone, Copy)]
pub enum ClientKey<'a> {
    /// A certificate (chain) and its private key, PEM.
    Pem {
        cert_pem: &'a str,
        key_pem: &'a Secret,
    },
    /// A certificate whose key signs through a callback (a secure element).
    Remote(&'a RemoteKey),
}

#[cfg(feature = "transport")]
/// A TLS client configuration for mutual authentication.
pub fn client_config(
    roots: &Roots,
    key: ClientKey<'_>,
    alpn: bool,
) -> Result<Arc<rustls::ClientConfig>, Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut store = rustls::RootCertStore::empty();
    match roots {
        Roots::Pem(pem) => {
            for cert in keys::parse_certificate_pem(pem)
                .map_err(|e| Error::InvalidArgument(format!("CA certificates: {e}")))?
            {
                store
                    .add(cert)
                    .map_err(|e| Error::InvalidArgument(format!("CA certificate: {e}")))?;
            }
        }
        #[cfg(not(feature = "system-roots"))]
        Roots::System => return Err(Error::InvalidArgument(NO_SYSTEM_ROOTS.into())),
        #[cfg(feature = "system-roots")]
        Roots::System => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                // Individual unusable system certificates are skipped, as browsers do.
                let _ = store.add(cert);
            }
            if store.is_empty() {
                return Err(Error::Tls(
                    "no usable system root certificates found".into(),
                ));
            }
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_root_certificates(store);
    let mut cfg = match key {
        ClientKey::Pem { cert_pem, key_pem } => {
            let chain: Vec<CertificateDer<'static>> = keys::parse_certificate_pem(cert_pem)
                .map_err(|e| Error::InvalidArgument(format!("client certificate: {e}")))?;
            let key: PrivateKeyDer<'static> = keys::parse_private_key_pem(key_pem.expose())
                .map_err(|e| Error::InvalidArgument(format!("client private key: {e}")))?;
            // rustls loads the key once and checks it against the certificate.
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| match e {
                    rustls::Error::InconsistentKeys(_) => Error::InvalidArgument(
                        "the client certificate does not match the private key".into(),
                    ),
                    other => Error::InvalidArgument(format!("client credentials: {other}")),
                })?
        }
        ClientKey::Remote(remote) => builder
            .with_client_cert_resolver(Arc::new(keys::remote::Resolver(remote.certified_key()))),
    };
    // Each configuration makes one or two connections: a session cache only costs memory.
    cfg.resumption = rustls::client::Resumption::disabled();
    if alpn {
        cfg.alpn_protocols = vec![ALPN_MQTT.to_vec()];
    }
    Ok(Arc::new(cfg))
}
