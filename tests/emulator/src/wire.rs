//! MQTT 3.1.1 and 5 packets behind one version-neutral shape.
//!
//! The codec itself is rumqttc's (`mqttbytes::v4` and `v5::mqttbytes::v5`); this module picks the
//! version from the CONNECT packet and converts to and from the few packet shapes the broker and
//! the tests need. It is public so that tests and tools can speak raw MQTT to the emulator.

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;

/// The MQTT protocol version of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// MQTT 3.1.1 (protocol level 4).
    V4,
    /// MQTT 5 (protocol level 5).
    V5,
}

/// A packet, whichever the version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    Connect {
        client_id: String,
        keep_alive: u16,
        clean: bool,
        will: Option<Will>,
    },
    /// `code` is the MQTT 5 reason code (0 success); MQTT 3.1.1 codes are mapped to and from it.
    ConnAck {
        code: u8,
        assigned_client_id: Option<String>,
        server_keep_alive: Option<u16>,
    },
    Publish {
        topic: String,
        qos: u8,
        pkid: u16,
        retain: bool,
        dup: bool,
        payload: Bytes,
        /// MQTT 5 topic alias, which the emulator does not allow (it advertises a maximum of 0).
        topic_alias: Option<u16>,
    },
    /// `reason` is the MQTT 5 reason code (0 success); MQTT 3.1.1 has none and sends a plain
    /// PUBACK.
    PubAck {
        pkid: u16,
        reason: u8,
    },
    Subscribe {
        pkid: u16,
        filters: Vec<(String, u8)>,
    },
    /// Per filter: `Ok(granted qos)` or `Err(reason code)`.
    SubAck {
        pkid: u16,
        codes: Vec<Result<u8, u8>>,
    },
    Unsubscribe {
        pkid: u16,
        filters: Vec<String>,
    },
    UnsubAck {
        pkid: u16,
        count: usize,
    },
    PingReq,
    PingResp,
    /// `reason` is an MQTT 5 reason code; MQTT 3.1.1 sends a bare DISCONNECT.
    Disconnect {
        reason: u8,
    },
    /// QoS 2 flow packets and AUTH: valid MQTT, not supported by AWS IoT.
    Unsupported(&'static str),
}

/// A last will carried in CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
}

/// Why a byte stream could not be read as MQTT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireError {
    /// More bytes are needed.
    Incomplete,
    /// The packet is larger than allowed.
    TooLarge,
    /// The first packet is not CONNECT, or names a protocol this broker does not speak.
    UnsupportedProtocol(u8),
    /// Anything else malformed.
    Malformed(String),
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WireError::Incomplete => f.write_str("incomplete packet"),
            WireError::TooLarge => f.write_str("packet too large"),
            WireError::UnsupportedProtocol(l) => write!(f, "unsupported protocol level {l}"),
            WireError::Malformed(m) => write!(f, "malformed packet: {m}"),
        }
    }
}

impl std::error::Error for WireError {}

/// Reads the protocol level of a CONNECT at the start of `buf` without consuming it.
/// `Ok(None)` means more bytes are needed.
pub fn peek_connect_version(buf: &[u8]) -> Result<Option<Version>, WireError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    if first != 0x10 {
        return Err(WireError::Malformed("first packet is not CONNECT".into()));
    }
    // Skip the remaining-length varint (at most 4 bytes).
    let mut pos = 1;
    loop {
        let Some(&b) = buf.get(pos) else {
            return Ok(None);
        };
        pos += 1;
        if b & 0x80 == 0 {
            break;
        }
        if pos > 4 {
            return Err(WireError::Malformed("bad remaining length".into()));
        }
    }
    let (Some(&hi), Some(&lo)) = (buf.get(pos), buf.get(pos + 1)) else {
        return Ok(None);
    };
    let name_len = usize::from(u16::from_be_bytes([hi, lo]));
    let name_start = pos + 2;
    let Some(level) = buf.get(name_start + name_len).copied() else {
        return Ok(None);
    };
    let name = &buf[name_start..name_start + name_len];
    match (name, level) {
        (b"MQTT", 4) => Ok(Some(Version::V4)),
        (b"MQTT", 5) => Ok(Some(Version::V5)),
        _ => Err(WireError::UnsupportedProtocol(level)),
    }
}

fn qos_u8_v4(q: rumqttc::mqttbytes::QoS) -> u8 {
    q as u8
}

fn qos_v4(q: u8) -> rumqttc::mqttbytes::QoS {
    match q {
        0 => rumqttc::mqttbytes::QoS::AtMostOnce,
        1 => rumqttc::mqttbytes::QoS::AtLeastOnce,
        _ => rumqttc::mqttbytes::QoS::ExactlyOnce,
    }
}

fn qos_v5(q: u8) -> rumqttc::v5::mqttbytes::QoS {
    match q {
        0 => rumqttc::v5::mqttbytes::QoS::AtMostOnce,
        1 => rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        _ => rumqttc::v5::mqttbytes::QoS::ExactlyOnce,
    }
}

fn codec_error(e: impl std::fmt::Display, too_large: bool, incomplete: bool) -> WireError {
    if incomplete {
        WireError::Incomplete
    } else if too_large {
        WireError::TooLarge
    } else {
        WireError::Malformed(e.to_string())
    }
}

/// Decodes one packet from the front of `buf`, consuming it. `max` bounds the whole packet size.
pub fn read(version: Version, buf: &mut BytesMut, max: usize) -> Result<Packet, WireError> {
    match version {
        Version::V4 => read_v4(buf, max),
        Version::V5 => read_v5(buf, max),
    }
}

fn read_v4(buf: &mut BytesMut, max: usize) -> Result<Packet, WireError> {
    use rumqttc::mqttbytes::Error as E;
    let too_large = |e: &E| matches!(e, E::PayloadSizeLimitExceeded(_) | E::PayloadTooLong);
    // Only the framing can be incomplete: once a whole packet is there, rumqttc consumes it, and
    // an error from inside it (even "insufficient bytes") means the packet is malformed.
    rumqttc::mqttbytes::check(buf.iter(), max).map_err(|e| {
        let incomplete = matches!(e, E::InsufficientBytes(_));
        codec_error(&e, too_large(&e), incomplete)
    })?;
    let packet = v4::Packet::read(buf, max).map_err(|e| codec_error(&e, too_large(&e), false))?;
    Ok(match packet {
        v4::Packet::Connect(c) => Packet::Connect {
            client_id: c.client_id,
            keep_alive: c.keep_alive,
            clean: c.clean_session,
            will: c.last_will.map(|w| Will {
                topic: w.topic,
                payload: w.message,
                qos: qos_u8_v4(w.qos),
            }),
        },
        v4::Packet::ConnAck(a) => Packet::ConnAck {
            code: match a.code {
                v4::ConnectReturnCode::Success => 0,
                v4::ConnectReturnCode::RefusedProtocolVersion => 0x84,
                v4::ConnectReturnCode::BadClientId => 0x85,
                v4::ConnectReturnCode::ServiceUnavailable => 0x88,
                v4::ConnectReturnCode::BadUserNamePassword => 0x86,
                v4::ConnectReturnCode::NotAuthorized => 0x87,
            },
            assigned_client_id: None,
            server_keep_alive: None,
        },
        v4::Packet::Publish(p) => Packet::Publish {
            topic: p.topic,
            qos: qos_u8_v4(p.qos),
            pkid: p.pkid,
            retain: p.retain,
            dup: p.dup,
            payload: p.payload,
            topic_alias: None,
        },
        v4::Packet::PubAck(a) => Packet::PubAck {
            pkid: a.pkid,
            reason: 0,
        },
        v4::Packet::Subscribe(s) => Packet::Subscribe {
            pkid: s.pkid,
            filters: s
                .filters
                .into_iter()
                .map(|f| (f.path, qos_u8_v4(f.qos)))
                .collect(),
        },
        v4::Packet::SubAck(s) => Packet::SubAck {
            pkid: s.pkid,
            codes: s
                .return_codes
                .into_iter()
                .map(|c| match c {
                    v4::SubscribeReasonCode::Success(q) => Ok(qos_u8_v4(q)),
                    v4::SubscribeReasonCode::Failure => Err(0x80),
                })
                .collect(),
        },
        v4::Packet::Unsubscribe(u) => Packet::Unsubscribe {
            pkid: u.pkid,
            filters: u.topics,
        },
        v4::Packet::UnsubAck(u) => Packet::UnsubAck {
            pkid: u.pkid,
            count: 0,
        },
        v4::Packet::PingReq => Packet::PingReq,
        v4::Packet::PingResp => Packet::PingResp,
        v4::Packet::Disconnect => Packet::Disconnect { reason: 0 },
        v4::Packet::PubRec(_) => Packet::Unsupported("PUBREC"),
        v4::Packet::PubRel(_) => Packet::Unsupported("PUBREL"),
        v4::Packet::PubComp(_) => Packet::Unsupported("PUBCOMP"),
    })
}

fn read_v5(buf: &mut BytesMut, max: usize) -> Result<Packet, WireError> {
    use rumqttc::v5::mqttbytes::Error as E;
    let max32 = u32::try_from(max).unwrap_or(u32::MAX);
    let too_large = |e: &E| matches!(e, E::PayloadSizeLimitExceeded { .. } | E::PayloadTooLong);
    // Only the framing can be incomplete (see read_v4).
    let frame = v5::check(buf.iter(), Some(max32))
        .map_err(|e| {
            let incomplete = matches!(e, E::InsufficientBytes(_));
            codec_error(&e, too_large(&e), incomplete)
        })?
        .frame_length();
    // What rumqttc's reader refuses although MQTT 5 allows it: a DISCONNECT without properties
    // (remaining length 0 for reason 0x00, as rumqttc itself sends it, or 1), and AUTH.
    match (buf[0], frame) {
        (0xE0, 2) => {
            let _ = buf.split_to(frame);
            return Ok(Packet::Disconnect { reason: 0 });
        }
        (0xE0, 3) => {
            let reason = buf[2];
            let _ = buf.split_to(frame);
            return Ok(Packet::Disconnect { reason });
        }
        (0xF0, _) => {
            let _ = buf.split_to(frame);
            return Ok(Packet::Unsupported("AUTH"));
        }
        _ => {}
    }
    let packet =
        v5::Packet::read(buf, Some(max32)).map_err(|e| codec_error(&e, too_large(&e), false))?;
    Ok(match packet {
        v5::Packet::Connect(c, will, _login) => Packet::Connect {
            client_id: c.client_id,
            keep_alive: c.keep_alive,
            clean: c.clean_start,
            will: will.map(|w| Will {
                topic: String::from_utf8_lossy(&w.topic).into_owned(),
                payload: w.message,
                qos: w.qos as u8,
            }),
        },
        v5::Packet::ConnAck(a) => Packet::ConnAck {
            code: connack_code_v5(a.code),
            assigned_client_id: a
                .properties
                .as_ref()
                .and_then(|p| p.assigned_client_identifier.clone()),
            server_keep_alive: a.properties.as_ref().and_then(|p| p.server_keep_alive),
        },
        v5::Packet::Publish(p) => {
            let topic = std::str::from_utf8(&p.topic)
                .map_err(|_| WireError::Malformed("topic is not UTF-8".into()))?
                .to_owned();
            Packet::Publish {
                topic,
                qos: p.qos as u8,
                pkid: p.pkid,
                retain: p.retain,
                dup: p.dup,
                topic_alias: p.properties.as_ref().and_then(|pr| pr.topic_alias),
                payload: p.payload,
            }
        }
        v5::Packet::PubAck(a) => Packet::PubAck {
            pkid: a.pkid,
            reason: puback_code_v5(a.reason),
        },
        v5::Packet::Subscribe(s) => Packet::Subscribe {
            pkid: s.pkid,
            filters: s
                .filters
                .into_iter()
                .map(|f| (f.path, f.qos as u8))
                .collect(),
        },
        v5::Packet::SubAck(s) => Packet::SubAck {
            pkid: s.pkid,
            codes: s
                .return_codes
                .into_iter()
                .map(|c| match c {
                    v5::SubscribeReasonCode::Success(q) => Ok(q as u8),
                    v5::SubscribeReasonCode::TopicFilterInvalid => Err(0x8F),
                    v5::SubscribeReasonCode::NotAuthorized => Err(0x87),
                    v5::SubscribeReasonCode::QuotaExceeded => Err(0x97),
                    _ => Err(0x80),
                })
                .collect(),
        },
        v5::Packet::Unsubscribe(u) => Packet::Unsubscribe {
            pkid: u.pkid,
            filters: u.filters,
        },
        v5::Packet::UnsubAck(u) => Packet::UnsubAck {
            pkid: u.pkid,
            count: u.reasons.len(),
        },
        v5::Packet::PingReq(_) => Packet::PingReq,
        v5::Packet::PingResp(_) => Packet::PingResp,
        v5::Packet::Disconnect(d) => Packet::Disconnect {
            reason: d.reason_code as u8,
        },
        v5::Packet::PubRec(_) => Packet::Unsupported("PUBREC"),
        v5::Packet::PubRel(_) => Packet::Unsupported("PUBREL"),
        v5::Packet::PubComp(_) => Packet::Unsupported("PUBCOMP"),
        v5::Packet::Auth(_) => Packet::Unsupported("AUTH"),
    })
}

fn connack_code_v5(code: v5::ConnectReturnCode) -> u8 {
    use v5::ConnectReturnCode as C;
    match code {
        C::Success => 0,
        C::UnspecifiedError => 0x80,
        C::MalformedPacket => 0x81,
        C::ProtocolError => 0x82,
        C::UnsupportedProtocolVersion | C::RefusedProtocolVersion => 0x84,
        C::ClientIdentifierNotValid | C::BadClientId => 0x85,
        C::BadUserNamePassword => 0x86,
        C::NotAuthorized => 0x87,
        C::ServerUnavailable | C::ServiceUnavailable => 0x88,
        C::ServerBusy => 0x89,
        C::Banned => 0x8A,
        C::QuotaExceeded => 0x97,
        _ => 0x83,
    }
}

fn connack_v5_code(code: u8) -> v5::ConnectReturnCode {
    use v5::ConnectReturnCode as C;
    match code {
        0 => C::Success,
        0x81 => C::MalformedPacket,
        0x82 => C::ProtocolError,
        0x84 => C::UnsupportedProtocolVersion,
        0x85 => C::ClientIdentifierNotValid,
        0x86 => C::BadUserNamePassword,
        0x87 => C::NotAuthorized,
        0x88 => C::ServerUnavailable,
        0x89 => C::ServerBusy,
        0x8A => C::Banned,
        0x97 => C::QuotaExceeded,
        0x83 => C::ImplementationSpecificError,
        _ => C::UnspecifiedError,
    }
}

fn puback_code_v5(reason: v5::PubAckReason) -> u8 {
    use v5::PubAckReason as R;
    match reason {
        R::Success => 0,
        R::NoMatchingSubscribers => 0x10,
        R::UnspecifiedError => 0x80,
        R::ImplementationSpecificError => 0x83,
        R::NotAuthorized => 0x87,
        R::TopicNameInvalid => 0x90,
        R::PacketIdentifierInUse => 0x91,
        R::QuotaExceeded => 0x97,
        R::PayloadFormatInvalid => 0x99,
    }
}

fn puback_reason_v5(code: u8) -> v5::PubAckReason {
    use v5::PubAckReason as R;
    match code {
        0 => R::Success,
        0x10 => R::NoMatchingSubscribers,
        0x83 => R::ImplementationSpecificError,
        0x87 => R::NotAuthorized,
        0x90 => R::TopicNameInvalid,
        0x91 => R::PacketIdentifierInUse,
        0x97 => R::QuotaExceeded,
        0x99 => R::PayloadFormatInvalid,
        _ => R::UnspecifiedError,
    }
}

fn disconnect_v5_code(code: u8) -> v5::DisconnectReasonCode {
    use v5::DisconnectReasonCode as D;
    match code {
        0 => D::NormalDisconnection,
        0x81 => D::MalformedPacket,
        0x82 => D::ProtocolError,
        0x83 => D::ImplementationSpecificError,
        0x87 => D::NotAuthorized,
        0x89 => D::ServerBusy,
        0x8B => D::ServerShuttingDown,
        0x8D => D::KeepAliveTimeout,
        0x8E => D::SessionTakenOver,
        0x8F => D::TopicFilterInvalid,
        0x90 => D::TopicNameInvalid,
        0x94 => D::TopicAliasInvalid,
        0x95 => D::PacketTooLarge,
        0x97 => D::QuotaExceeded,
        0x9B => D::QoSNotSupported,
        _ => D::UnspecifiedError,
    }
}

/// Encodes `packet` at the end of `out`.
pub fn write(version: Version, packet: &Packet, out: &mut BytesMut) -> Result<(), WireError> {
    let max = usize::MAX >> 1;
    match version {
        Version::V4 => to_v4(packet)
            .ok_or_else(|| WireError::Malformed("no MQTT 3.1.1 form".into()))?
            .write(out, max)
            .map(|_| ())
            .map_err(|e| WireError::Malformed(e.to_string())),
        // rumqttc writes a DISCONNECT with a reason as `e0 01 rr 00`, a property length its
        // remaining length does not count; written here with the length counted, the one form
        // every reader understands (rumqttc's refuses the short `e0 00` and `e0 01 rr`).
        Version::V5 => match packet {
            Packet::Disconnect { reason } => {
                out.extend_from_slice(&[0xE0, 0x02, disconnect_v5_code(*reason) as u8, 0x00]);
                Ok(())
            }
            _ => match to_v5(packet) {
                Some(p) => p
                    .write(out, None)
                    .map(|_| ())
                    .map_err(|e| WireError::Malformed(e.to_string())),
                None => Err(WireError::Malformed("no MQTT 5 form".into())),
            },
        },
    }
}

fn to_v4(packet: &Packet) -> Option<v4::Packet> {
    Some(match packet {
        Packet::Connect {
            client_id,
            keep_alive,
            clean,
            will,
        } => {
            let mut c = v4::Connect::new(client_id.clone());
            c.keep_alive = *keep_alive;
            c.clean_session = *clean;
            c.last_will = will.as_ref().map(|w| {
                v4::LastWill::new(w.topic.clone(), w.payload.to_vec(), qos_v4(w.qos), false)
            });
            v4::Packet::Connect(c)
        }
        Packet::ConnAck { code, .. } => v4::Packet::ConnAck(v4::ConnAck::new(
            match code {
                0 => v4::ConnectReturnCode::Success,
                0x84 => v4::ConnectReturnCode::RefusedProtocolVersion,
                0x85 => v4::ConnectReturnCode::BadClientId,
                0x86 => v4::ConnectReturnCode::BadUserNamePassword,
                0x87 => v4::ConnectReturnCode::NotAuthorized,
                _ => v4::ConnectReturnCode::ServiceUnavailable,
            },
            false,
        )),
        Packet::Publish {
            topic,
            qos,
            pkid,
            retain,
            dup,
            payload,
            ..
        } => {
            let mut p = v4::Publish::new(topic.clone(), qos_v4(*qos), payload.to_vec());
            p.pkid = *pkid;
            p.retain = *retain;
            p.dup = *dup;
            v4::Packet::Publish(p)
        }
        Packet::PubAck { pkid, .. } => v4::Packet::PubAck(v4::PubAck::new(*pkid)),
        Packet::Subscribe { pkid, filters } => {
            let mut s = v4::Subscribe::new_many(
                filters
                    .iter()
                    .map(|(f, q)| v4::SubscribeFilter::new(f.clone(), qos_v4(*q))),
            );
            s.pkid = *pkid;
            v4::Packet::Subscribe(s)
        }
        Packet::SubAck { pkid, codes } => v4::Packet::SubAck(v4::SubAck::new(
            *pkid,
            codes
                .iter()
                .map(|c| match c {
                    Ok(q) => v4::SubscribeReasonCode::Success(qos_v4(*q)),
                    Err(_) => v4::SubscribeReasonCode::Failure,
                })
                .collect(),
        )),
        Packet::Unsubscribe { pkid, filters } => {
            let mut u = v4::Unsubscribe::new(filters.first().cloned().unwrap_or_default());
            u.topics = filters.clone();
            u.pkid = *pkid;
            v4::Packet::Unsubscribe(u)
        }
        Packet::UnsubAck { pkid, .. } => v4::Packet::UnsubAck(v4::UnsubAck::new(*pkid)),
        Packet::PingReq => v4::Packet::PingReq,
        Packet::PingResp => v4::Packet::PingResp,
        Packet::Disconnect { .. } => v4::Packet::Disconnect,
        Packet::Unsupported(_) => return None,
    })
}

fn to_v5(packet: &Packet) -> Option<v5::Packet> {
    Some(match packet {
        Packet::Connect {
            client_id,
            keep_alive,
            clean,
            will,
        } => {
            let c = v5::Connect {
                keep_alive: *keep_alive,
                client_id: client_id.clone(),
                clean_start: *clean,
                properties: None,
            };
            let will = will.as_ref().map(|w| {
                v5::LastWill::new(
                    w.topic.clone(),
                    w.payload.to_vec(),
                    qos_v5(w.qos),
                    false,
                    None,
                )
            });
            v5::Packet::Connect(c, will, None)
        }
        Packet::ConnAck {
            code,
            assigned_client_id,
            server_keep_alive,
        } => {
            let properties = (*code == 0).then(|| v5::ConnAckProperties {
                session_expiry_interval: None,
                receive_max: Some(100),
                max_qos: Some(1),
                retain_available: Some(0),
                max_packet_size: Some(crate::topics::MAX_PACKET as u32),
                assigned_client_identifier: assigned_client_id.clone(),
                topic_alias_max: None,
                reason_string: None,
                user_properties: Vec::new(),
                wildcard_subscription_available: Some(1),
                subscription_identifiers_available: Some(0),
                shared_subscription_available: Some(0),
                server_keep_alive: *server_keep_alive,
                response_information: None,
                server_reference: None,
                authentication_method: None,
                authentication_data: None,
            });
            v5::Packet::ConnAck(v5::ConnAck {
                session_present: false,
                code: connack_v5_code(*code),
                properties,
            })
        }
        Packet::Publish {
            topic,
            qos,
            pkid,
            retain,
            dup,
            payload,
            topic_alias,
        } => {
            let mut p = v5::Publish::new(topic.clone(), qos_v5(*qos), payload.clone(), None);
            p.pkid = *pkid;
            p.retain = *retain;
            p.dup = *dup;
            if let Some(alias) = topic_alias {
                p.properties = Some(v5::PublishProperties {
                    topic_alias: Some(*alias),
                    ..Default::default()
                });
            }
            v5::Packet::Publish(p)
        }
        Packet::PubAck { pkid, reason } => {
            let mut a = v5::PubAck::new(*pkid, None);
            a.reason = puback_reason_v5(*reason);
            v5::Packet::PubAck(a)
        }
        Packet::Subscribe { pkid, filters } => {
            let mut s = v5::Subscribe::new_many(
                filters
                    .iter()
                    .map(|(f, q)| v5::Filter::new(f.clone(), qos_v5(*q))),
                None,
            );
            s.pkid = *pkid;
            v5::Packet::Subscribe(s)
        }
        Packet::SubAck { pkid, codes } => v5::Packet::SubAck(v5::SubAck {
            pkid: *pkid,
            return_codes: codes
                .iter()
                .map(|c| match c {
                    Ok(q) => v5::SubscribeReasonCode::Success(qos_v5(*q)),
                    Err(0x8F) => v5::SubscribeReasonCode::TopicFilterInvalid,
                    Err(0x87) => v5::SubscribeReasonCode::NotAuthorized,
                    Err(0x97) => v5::SubscribeReasonCode::QuotaExceeded,
                    Err(_) => v5::SubscribeReasonCode::Unspecified,
                })
                .collect(),
            properties: None,
        }),
        Packet::Unsubscribe { pkid, filters } => {
            let mut u = v5::Unsubscribe::new(filters.first().cloned().unwrap_or_default(), None);
            u.filters = filters.clone();
            u.pkid = *pkid;
            v5::Packet::Unsubscribe(u)
        }
        Packet::UnsubAck { pkid, count } => v5::Packet::UnsubAck(v5::UnsubAck {
            pkid: *pkid,
            reasons: vec![v5::UnsubAckReason::Success; *count],
            properties: None,
        }),
        Packet::PingReq => v5::Packet::PingReq(v5::PingReq),
        Packet::PingResp => v5::Packet::PingResp(v5::PingResp),
        Packet::Disconnect { reason } => {
            v5::Packet::Disconnect(v5::Disconnect::new(disconnect_v5_code(*reason)))
        }
        Packet::Unsupported(_) => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(version: Version, p: Packet) -> Packet {
        let mut buf = BytesMut::new();
        write(version, &p, &mut buf).expect("encode");
        let back = read(version, &mut buf, 1 << 20).expect("decode");
        assert!(buf.is_empty());
        back
    }

    #[test]
    fn packets_survive_both_versions() {
        for v in [Version::V4, Version::V5] {
            let p = Packet::Publish {
                topic: "a/b".into(),
                qos: 1,
                pkid: 7,
                retain: false,
                dup: false,
                payload: Bytes::from_static(b"hi"),
                topic_alias: None,
            };
            assert_eq!(round_trip(v, p.clone()), p);
            let s = Packet::Subscribe {
                pkid: 3,
                filters: vec![("x/#".into(), 1), ("y/+".into(), 0)],
            };
            assert_eq!(round_trip(v, s.clone()), s);
            let a = Packet::SubAck {
                pkid: 3,
                codes: vec![Ok(1), Err(0x80)],
            };
            assert_eq!(round_trip(v, a.clone()), a);
            let ack = Packet::PubAck { pkid: 9, reason: 0 };
            assert_eq!(round_trip(v, ack.clone()), ack);
        }
        // A PUBACK's reason code exists in MQTT 5 only.
        let denied = Packet::PubAck {
            pkid: 9,
            reason: 0x87,
        };
        assert_eq!(round_trip(Version::V5, denied.clone()), denied);
        assert_eq!(
            round_trip(Version::V4, denied),
            Packet::PubAck { pkid: 9, reason: 0 }
        );
    }

    #[test]
    fn disconnect_and_auth_in_every_mqtt5_form() {
        for reason in [0u8, 0x81, 0x8E, 0x9B] {
            let mut buf = BytesMut::new();
            write(Version::V5, &Packet::Disconnect { reason }, &mut buf).unwrap();
            assert_eq!(&buf[..], [0xE0, 2, reason, 0]);
            // rumqttc's own reader (used by MQTT 5 clients) understands it too.
            let mut copy = buf.clone();
            assert!(matches!(
                v5::Packet::read(&mut copy, None),
                Ok(v5::Packet::Disconnect(d)) if d.reason_code as u8 == reason
            ));
            assert_eq!(
                read(Version::V5, &mut buf, 1 << 20),
                Ok(Packet::Disconnect { reason })
            );
            assert!(buf.is_empty());
        }
        let rows: &[(&[u8], Result<Packet, ()>)] = &[
            (&[0xE0, 0], Ok(Packet::Disconnect { reason: 0 })),
            (&[0xE0, 1, 0x04], Ok(Packet::Disconnect { reason: 0x04 })),
            (&[0xF0, 0], Ok(Packet::Unsupported("AUTH"))),
            (&[0xF0, 2, 0, 0], Ok(Packet::Unsupported("AUTH"))),
            // A whole packet whose inside is short is malformed, not incomplete.
            (&[0x30, 1, 0], Err(())),
        ];
        for (bytes, want) in rows {
            let mut buf = BytesMut::from(*bytes);
            let got = read(Version::V5, &mut buf, 1 << 20);
            match want {
                Ok(p) => assert_eq!(got.as_ref(), Ok(p), "{bytes:02x?}"),
                Err(()) => assert!(matches!(got, Err(WireError::Malformed(_))), "{got:?}"),
            }
        }
        let mut buf = BytesMut::from(&[0x30, 1, 0][..]);
        assert!(matches!(
            read(Version::V4, &mut buf, 1 << 20),
            Err(WireError::Malformed(_))
        ));
    }

    #[test]
    fn connect_version_is_peeked() {
        for (v, level) in [(Version::V4, 4u8), (Version::V5, 5u8)] {
            let mut buf = BytesMut::new();
            let c = Packet::Connect {
                client_id: "dev".into(),
                keep_alive: 30,
                clean: true,
                will: None,
            };
            write(v, &c, &mut buf).unwrap();
            assert_eq!(
                peek_connect_version(&buf).unwrap(),
                Some(v),
                "level {level}"
            );
            for cut in 0..8 {
                assert_eq!(peek_connect_version(&buf[..cut]).unwrap(), None);
            }
        }
        assert!(peek_connect_version(b"\x30\x00").is_err());
        assert_eq!(
            peek_connect_version(b"\x10\x0c\x00\x06MQIsdp\x03"),
            Err(WireError::UnsupportedProtocol(3))
        );
    }
}
