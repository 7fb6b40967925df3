//! MQTT reason codes as a user should read them: which packet carried it, its name in the MQTT
//! specification, what it usually means with AWS IoT, and whether trying again can help.

use std::fmt;

/// The packet that carried a reason code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MqttPacket {
    /// The answer to CONNECT.
    ConnAck,
    /// The server ending the connection (MQTT 5).
    Disconnect,
    /// The answer to a QoS 1 PUBLISH (MQTT 5).
    PubAck,
    /// The answer to SUBSCRIBE, one code per filter.
    SubAck,
}

impl fmt::Display for MqttPacket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MqttPacket::ConnAck => "CONNACK",
            MqttPacket::Disconnect => "DISCONNECT",
            MqttPacket::PubAck => "PUBACK",
            MqttPacket::SubAck => "SUBACK",
        })
    }
}

/// The broker refused something, or ended the connection, with an MQTT reason code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttRefusal {
    /// What was refused, with the endpoint: "iot.example.com:8883 refused the MQTT connection".
    pub context: String,
    pub packet: MqttPacket,
    /// The MQTT 5 reason code, or the MQTT 3.1.1 CONNACK return code (1 to 5).
    pub reason_code: u8,
    /// Whether the connection spoke MQTT 5 (which tells how `reason_code` reads).
    pub mqtt5: bool,
    /// The server's reason string (MQTT 5), when it sent one.
    pub reason_string: Option<String>,
    /// What the library adds at the end (when, after how many attempts); may be empty.
    pub note: String,
}

impl MqttRefusal {
    /// The reason code's name in the MQTT specification, in lower case.
    pub fn reason_name(&self) -> &'static str {
        if !self.mqtt5 && self.packet == MqttPacket::ConnAck {
            return match self.reason_code {
                0 => "connection accepted",
                1 => "unacceptable protocol version",
                2 => "identifier rejected",
                3 => "server unavailable",
                4 => "bad user name or password",
                5 => "not authorized",
                _ => "unknown return code",
            };
        }
        reason_name(self.reason_code)
    }

    /// Whether trying again later can help: the server is busy, unavailable, moving, or a
    /// rate or quota was exceeded; not when the request itself is refused.
    pub fn is_retryable(&self) -> bool {
        if !self.mqtt5 && self.packet == MqttPacket::ConnAck {
            return self.reason_code == 3;
        }
        matches!(
            self.reason_code,
            0x80 | 0x83
                | 0x88
                | 0x89
                | 0x8B
                | 0x8D
                | 0x8E
                | 0x93
                | 0x96
                | 0x97
                | 0x98
                | 0x9C
                | 0x9F
                | 0xA0
        )
    }

    /// What the code usually means with AWS IoT Core, when there is more to say than its name.
    fn hint(&self) -> Option<&'static str> {
        let not_authorized = if self.mqtt5 {
            self.reason_code == 0x87
        } else {
            self.packet == MqttPacket::ConnAck && self.reason_code == 5
        };
        if not_authorized {
            return Some(match self.packet {
                MqttPacket::ConnAck => {
                    "the certificate's policy does not allow iot:Connect with this client id"
                }
                MqttPacket::PubAck => "the policy does not allow iot:Publish to this topic",
                MqttPacket::SubAck => {
                    "the policy does not allow iot:Subscribe to this topic filter"
                }
                MqttPacket::Disconnect => "the policy does not allow what the client last sent",
            });
        }
        match (self.packet, self.reason_code) {
            (MqttPacket::ConnAck, 0x97) | (MqttPacket::ConnAck, 0x9F) => Some(
                "AWS IoT accepts one CONNECT per second per client id, and a limited number per \
                 second per account",
            ),
            (_, 0x8E) => Some("another connection with the same client id took over"),
            (_, 0x8D) => Some("nothing reached the server for 1.5 times the keep-alive"),
            (MqttPacket::SubAck, 0x80) => Some(
                "over MQTT 3.1.1 AWS IoT answers so when the policy does not allow \
                 iot:Subscribe to this topic filter",
            ),
            _ => None,
        }
    }
}

impl fmt::Display for MqttRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.mqtt5 {
            "reason code"
        } else {
            "return code"
        };
        write!(
            f,
            "{}: {} {kind} 0x{:02X} ({})",
            self.context,
            self.packet,
            self.reason_code,
            self.reason_name()
        )?;
        if let Some(hint) = self.hint() {
            write!(f, ": {hint}")?;
        }
        if let Some(reason) = &self.reason_string {
            write!(f, "; the server said: {reason:?}")?;
        }
        if !self.note.is_empty() {
            write!(f, " {}", self.note)?;
        }
        Ok(())
    }
}

/// An MQTT 5 reason code's name (MQTT 5.0 section 2.4), in lower case.
pub fn reason_name(code: u8) -> &'static str {
    match code {
        0x00 => "success",
        0x01 => "granted QoS 1",
        0x02 => "granted QoS 2",
        0x04 => "disconnect with will message",
        0x10 => "no matching subscribers",
        0x80 => "unspecified error",
        0x81 => "malformed packet",
        0x82 => "protocol error",
        0x83 => "implementation specific error",
        0x84 => "unsupported protocol version",
        0x85 => "client identifier not valid",
        0x86 => "bad user name or password",
        0x87 => "not authorized",
        0x88 => "server unavailable",
        0x89 => "server busy",
        0x8A => "banned",
        0x8B => "server shutting down",
        0x8C => "bad authentication method",
        0x8D => "keep alive timeout",
        0x8E => "session taken over",
        0x8F => "topic filter invalid",
        0x90 => "topic name invalid",
        0x91 => "packet identifier in use",
        0x93 => "receive maximum exceeded",
        0x94 => "topic alias invalid",
        0x95 => "packet too large",
        0x96 => "message rate too high",
        0x97 => "quota exceeded",
        0x98 => "administrative action",
        0x99 => "payload format invalid",
        0x9A => "retain not supported",
        0x9B => "QoS not supported",
        0x9C => "use another server",
        0x9D => "server moved",
        0x9E => "shared subscriptions not supported",
        0x9F => "connection rate exceeded",
        0xA0 => "maximum connect time",
        0xA1 => "subscription identifiers not supported",
        0xA2 => "wildcard subscriptions not supported",
        _ => "unknown reason code",
    }
}

/// A SUBACK code refusing `filter`, in words: "FILTER (SUBACK code 0x87, not authorized: the
/// policy does not allow ...)". MQTT 3.1.1 has one failure code, 0x80, which MQTT 5 calls
/// "unspecified error".
pub fn suback_refusal(filter: &str, code: u8) -> String {
    let name = if code == 0x80 {
        "failure"
    } else {
        reason_name(code)
    };
    let refusal = MqttRefusal {
        context: String::new(),
        packet: MqttPacket::SubAck,
        reason_code: code,
        mqtt5: true,
        reason_string: None,
        note: String::new(),
    };
    match refusal.hint() {
        Some(hint) => format!("{filter} (SUBACK code 0x{code:02X}, {name}: {hint})"),
        None => format!("{filter} (SUBACK code 0x{code:02X}, {name})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(packet: MqttPacket, code: u8, mqtt5: bool) -> MqttRefusal {
        MqttRefusal {
            context: "h:8883 refused the MQTT connection".into(),
            packet,
            reason_code: code,
            mqtt5,
            reason_string: None,
            note: String::new(),
        }
    }

    #[test]
    fn texts_name_the_packet_the_code_and_what_it_means() {
        let mut r = refusal(MqttPacket::ConnAck, 0x87, true);
        r.reason_string = Some("policy denied".into());
        assert_eq!(
            r.to_string(),
            "h:8883 refused the MQTT connection: CONNACK reason code 0x87 (not authorized): the \
             certificate's policy does not allow iot:Connect with this client id; the server \
             said: \"policy denied\""
        );
        assert_eq!(
            refusal(MqttPacket::ConnAck, 5, false).to_string(),
            "h:8883 refused the MQTT connection: CONNACK return code 0x05 (not authorized): the \
             certificate's policy does not allow iot:Connect with this client id"
        );
        assert!(refusal(MqttPacket::Disconnect, 0x8E, true)
            .to_string()
            .contains("DISCONNECT reason code 0x8E (session taken over)"));
        assert_eq!(
            suback_refusal("$aws/x", 0x87),
            "$aws/x (SUBACK code 0x87, not authorized: the policy does not allow iot:Subscribe \
             to this topic filter)"
        );
        assert!(suback_refusal("$aws/x", 0x80).contains("0x80, failure: over MQTT 3.1.1"));
        assert_eq!(
            suback_refusal("$aws/x", 0x8F),
            "$aws/x (SUBACK code 0x8F, topic filter invalid)"
        );
    }

    #[test]
    fn only_what_can_pass_later_is_retryable() {
        for (packet, code, mqtt5, retry) in [
            (MqttPacket::ConnAck, 0x87, true, false),
            (MqttPacket::ConnAck, 0x97, true, true),
            (MqttPacket::ConnAck, 0x9F, true, true),
            (MqttPacket::ConnAck, 0x84, true, false),
            (MqttPacket::ConnAck, 3, false, true),
            (MqttPacket::ConnAck, 5, false, false),
            (MqttPacket::Disconnect, 0x8B, true, true),
            (MqttPacket::Disconnect, 0x90, true, false),
            (MqttPacket::PubAck, 0x87, true, false),
            (MqttPacket::PubAck, 0x97, true, true),
        ] {
            assert_eq!(
                refusal(packet, code, mqtt5).is_retryable(),
                retry,
                "{packet} {code:#x} mqtt5={mqtt5}"
            );
        }
    }
}
