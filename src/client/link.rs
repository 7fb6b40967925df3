//! One rumqttc connection, as every loop of the built-in transport sees it: which SUBSCRIBE is
//! in flight, its SUBACK matched by packet id, errors mapped to the library's, and the replies
//! read together with a close kept rather than lost.

use std::sync::Arc;

use rumqttc::{AsyncClient, Event as MqttEvent, EventLoop, Outgoing, Packet, QoS};

use super::{connection_error, granted, leftover_publishes, open_connection, Config, Credential};
use crate::error::Error;

/// What a connection reported.
pub(crate) enum LinkEvent {
    /// The CONNACK of a connection being opened (accepted: a refusal is [`LinkEvent::Lost`]).
    Connected,
    /// The SUBACK of the SUBSCRIBE in flight: its filters, and each granted (true) or refused.
    SubAck {
        filters: Vec<String>,
        granted: Vec<bool>,
    },
    /// An incoming PUBLISH.
    Message(rumqttc::Publish),
    /// Anything else (PINGRESP, PUBACK, outgoing packets): time passed. `incoming`: the
    /// broker sent it.
    Other { incoming: bool },
    /// The connection failed (`connecting`: before its CONNACK). `leftovers` are replies read
    /// in the same read as the close, in order: still worth handling.
    Lost {
        error: Error,
        connecting: bool,
        leftovers: Vec<rumqttc::Publish>,
    },
}

/// A connection opened by [`Link::open`]: not connected until [`LinkEvent::Connected`].
pub(crate) struct Link {
    pub(crate) client: AsyncClient,
    pub(crate) events: EventLoop,
    /// Until CONNACK.
    connecting: bool,
    /// The SUBSCRIBE in flight: its filters, and its packet id once rumqttc assigns it.
    pending: Option<(Vec<String>, Option<u16>)>,
    /// The endpoint and trust settings, for error messages.
    config: Config,
    /// Whose certificate this connection authenticates with.
    who: Credential,
}

impl Link {
    /// Opens a connection to `config`'s endpoint with credentials `tls`, the certificate of
    /// `who` (the first poll connects). An empty `client_id` gets a random one.
    pub(crate) fn open(
        config: &Config,
        tls: Arc<rustls::ClientConfig>,
        client_id: &str,
        who: Credential,
    ) -> Link {
        let (client, events) = open_connection(config, tls, client_id);
        Link {
            client,
            events,
            connecting: true,
            pending: None,
            config: config.clone(),
            who,
        }
    }

    /// Queues one SUBSCRIBE (QoS 1) with `filters`.
    pub(crate) fn subscribe(&mut self, filters: &[String]) -> Result<(), Error> {
        let subs = filters
            .iter()
            .map(|f| rumqttc::SubscribeFilter::new(f.clone(), QoS::AtLeastOnce));
        self.client
            .try_subscribe_many(subs)
            .map_err(|e| Error::Connection(e.to_string()))?;
        self.pending = Some((filters.to_vec(), None));
        Ok(())
    }

    /// Queues one PUBLISH (QoS 1, not retained).
    pub(crate) fn publish(&mut self, topic: &str, payload: &[u8]) -> Result<(), Error> {
        self.client
            .try_publish(topic, QoS::AtLeastOnce, false, payload.to_vec())
            .map_err(|e| Error::Connection(e.to_string()))
    }

    /// Drives the connection until it reports something.
    pub(crate) async fn next(&mut self) -> LinkEvent {
        match self.events.poll().await {
            Ok(MqttEvent::Incoming(Packet::ConnAck(_))) if self.connecting => {
                self.connecting = false;
                LinkEvent::Connected
            }
            Ok(MqttEvent::Outgoing(Outgoing::Subscribe(pkid))) => {
                if let Some((_, id @ None)) = &mut self.pending {
                    *id = Some(pkid);
                }
                LinkEvent::Other { incoming: false }
            }
            Ok(MqttEvent::Incoming(Packet::SubAck(ack))) => match self.pending.take() {
                Some((filters, Some(pkid))) if pkid == ack.pkid => LinkEvent::SubAck {
                    filters,
                    granted: granted(&ack),
                },
                other => {
                    self.pending = other;
                    LinkEvent::Other { incoming: true }
                }
            },
            Ok(MqttEvent::Incoming(Packet::Publish(p))) => LinkEvent::Message(p),
            Ok(MqttEvent::Incoming(_)) => LinkEvent::Other { incoming: true },
            Ok(MqttEvent::Outgoing(_)) => LinkEvent::Other { incoming: false },
            Err(e) => LinkEvent::Lost {
                leftovers: leftover_publishes(&mut self.events),
                error: connection_error(e, &self.config, self.who),
                connecting: self.connecting,
            },
        }
    }

    /// Sends DISCONNECT and lets it out (see [`super::close`]).
    pub(crate) async fn close(mut self) {
        super::close(&self.client, &mut self.events).await;
    }

    /// Queues a DISCONNECT without waiting: dropping the event loop closes the socket.
    pub(crate) fn abandon(self) {
        let _ = self.client.try_disconnect();
    }
}
