//! A build without the built-in transport (cargo feature `transport` off): the firmware's own
//! MQTT and TLS drive the flow through the host API. What needs the built-in transport is
//! refused with [`Error::InvalidArgument`]; no [`Client`] can be made.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;

use super::{Cancel, Config, LogFn, ProgressFn, NO_TRANSPORT};
use crate::driver::Driver;
use crate::engine::flow::Provisioned;
use crate::error::Error;
use crate::protocol::{CreatedCertificate, Registered};
use crate::secret::Secret;

fn refused<T>() -> Result<T, Error> {
    Err(Error::InvalidArgument(NO_TRANSPORT.into()))
}

/// The one-call flow needs the built-in transport.
pub(crate) fn run_flow(
    _driver: Driver,
    _config: &Config,
    _log: Option<LogFn>,
    _cancel: &Arc<Cancel>,
) -> Result<Provisioned, Error> {
    refused()
}

/// The step-by-step client of the built-in transport; in this build none can be made
/// ([`Client::new`] fails), so no method is ever reached.
#[derive(Debug)]
pub struct Client {
    none: Infallible,
}

impl Client {
    /// Always fails: this build has no transport.
    pub fn new(config: Config) -> Result<Client, Error> {
        config.validate()?;
        refused()
    }

    pub fn set_progress(&mut self, _progress: Option<ProgressFn>) {
        match self.none {}
    }

    pub fn set_log(&mut self, _log: Option<LogFn>) {
        match self.none {}
    }

    pub fn set_cancel(&mut self, _cancel: Arc<Cancel>) {
        match self.none {}
    }

    pub fn canceller(&self) -> Arc<Cancel> {
        match self.none {}
    }

    pub fn config(&self) -> &Config {
        match self.none {}
    }

    pub fn connect(&mut self) -> Result<(), Error> {
        match self.none {}
    }

    pub fn disconnect(&mut self) {
        match self.none {}
    }

    pub fn create_keys_and_certificate(&mut self) -> Result<CreatedCertificate, Error> {
        match self.none {}
    }

    pub fn create_certificate_from_csr(
        &mut self,
        _csr_pem: &str,
        _key: Option<&Secret>,
    ) -> Result<CreatedCertificate, Error> {
        match self.none {}
    }

    pub fn register_thing(
        &mut self,
        _template: &str,
        _token: &Secret,
        _parameters: &BTreeMap<String, String>,
    ) -> Result<Registered, Error> {
        match self.none {}
    }
}
