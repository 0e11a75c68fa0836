//! A minimal MQTT 3.1.1 / 5 codec for the broker side of the device
//! endpoint: it reads the packets a client sends and writes the
//! acknowledgements a broker answers with. MQTT 5 properties are skipped,
//! never interpreted.

use tokio::io::{AsyncRead, AsyncReadExt as _};

/// Largest packet read (AWS IoT's own limit is 128 KiB of payload).
pub(crate) const MAX_PACKET: usize = 256 * 1024;

/// The protocol levels of MQTT 3.1, 3.1.1 and 5.
pub(crate) const LEVEL_3_1: u8 = 3;
pub(crate) const LEVEL_3_1_1: u8 = 4;
pub(crate) const LEVEL_5: u8 = 5;

/// The CONNACK return code for a protocol level the broker does not speak.
pub(crate) const UNACCEPTABLE_PROTOCOL_VERSION: u8 = 0x01;

/// A packet a client sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Packet {
    Connect {
        level: u8,
        client_id: String,
        keep_alive: u16,
    },
    Publish {
        qos: u8,
        packet_id: Option<u16>,
        topic: String,
        payload: Vec<u8>,
    },
    PubAck(u16),
    PubRec(u16),
    PubRel(u16),
    PubComp(u16),
    Subscribe {
        packet_id: u16,
        /// Topic filters and the QoS asked for each.
        filters: Vec<(String, u8)>,
    },
    Unsubscribe {
        packet_id: u16,
        filters: Vec<String>,
    },
    PingReq,
    Disconnect,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum MqttError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("malformed MQTT packet: {0}")]
    Malformed(String),
    #[error("MQTT packet of {0} bytes is larger than the {MAX_PACKET} allowed")]
    TooLarge(usize),
}

fn malformed<T>(message: impl Into<String>) -> Result<T, MqttError> {
    Err(MqttError::Malformed(message.into()))
}

/// Reads one packet: its first byte and the rest after the remaining
/// length. `None` when the stream ends cleanly before a packet starts.
pub(crate) async fn read_frame<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Option<(u8, Vec<u8>)>, MqttError> {
    let mut first = [0u8; 1];
    if reader.read(&mut first).await? == 0 {
        return Ok(None);
    }
    let mut length = 0usize;
    let mut shift = 0;
    loop {
        let byte = reader.read_u8().await?;
        length |= usize::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            break;
        }
        shift += 7;
        if shift > 21 {
            return malformed("the remaining length takes more than 4 bytes");
        }
    }
    if length > MAX_PACKET {
        return Err(MqttError::TooLarge(length));
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body).await?;
    Ok(Some((first[0], body)))
}

/// Appends the variable byte integer encoding of `n`.
pub(crate) fn encode_length(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut byte = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if n == 0 {
            break;
        }
    }
}

/// A cursor over a packet body.
struct Body<'a> {
    bytes: &'a [u8],
}

impl<'a> Body<'a> {
    fn u8(&mut self) -> Result<u8, MqttError> {
        let (&first, rest) = self
            .bytes
            .split_first()
            .ok_or_else(|| MqttError::Malformed("packet too short".to_owned()))?;
        self.bytes = rest;
        Ok(first)
    }

    fn u16(&mut self) -> Result<u16, MqttError> {
        Ok(u16::from_be_bytes([self.u8()?, self.u8()?]))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], MqttError> {
        if self.bytes.len() < n {
            return malformed("packet too short");
        }
        let (taken, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(taken)
    }

    fn string(&mut self) -> Result<String, MqttError> {
        let n = usize::from(self.u16()?);
        let bytes = self.take(n)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| MqttError::Malformed("a string is not UTF-8".to_owned()))
    }

    fn varint(&mut self) -> Result<usize, MqttError> {
        let mut n = 0usize;
        for shift in [0, 7, 14, 21] {
            let byte = self.u8()?;
            n |= usize::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(n);
            }
        }
        malformed("a variable byte integer takes more than 4 bytes")
    }

    /// Skips MQTT 5 properties.
    fn skip_properties(&mut self) -> Result<(), MqttError> {
        let n = self.varint()?;
        self.take(n).map(|_| ())
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.bytes)
    }

    fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

/// Decodes a packet a client sent; `v5` says whether the connection speaks
/// MQTT 5 (as its CONNECT said).
pub(crate) fn parse(first: u8, body: &[u8], v5: bool) -> Result<Packet, MqttError> {
    let kind = first >> 4;
    let flags = first & 0x0f;
    let mut body = Body { bytes: body };
    let packet = match kind {
        1 => {
            let name = body.string()?;
            if name != "MQTT" && name != "MQIsdp" {
                return malformed(format!("unknown protocol name `{name}`"));
            }
            let level = body.u8()?;
            let _connect_flags = body.u8()?;
            let keep_alive = body.u16()?;
            if level == LEVEL_5 {
                body.skip_properties()?;
            }
            let client_id = body.string()?;
            Packet::Connect {
                level,
                client_id,
                keep_alive,
            }
        }
        3 => {
            let qos = (flags >> 1) & 0x03;
            if qos == 3 {
                return malformed("PUBLISH with QoS 3");
            }
            let topic = body.string()?;
            let packet_id = if qos > 0 { Some(body.u16()?) } else { None };
            if v5 {
                body.skip_properties()?;
            }
            Packet::Publish {
                qos,
                packet_id,
                topic,
                payload: body.rest().to_vec(),
            }
        }
        4 => Packet::PubAck(body.u16()?),
        5 => Packet::PubRec(body.u16()?),
        6 => Packet::PubRel(body.u16()?),
        7 => Packet::PubComp(body.u16()?),
        8 | 10 => {
            if flags != 0b0010 {
                return malformed("SUBSCRIBE or UNSUBSCRIBE with reserved flags other than 0010");
            }
            let packet_id = body.u16()?;
            if v5 {
                body.skip_properties()?;
            }
            if kind == 8 {
                let mut filters = Vec::new();
                while !body.is_empty() {
                    let filter = body.string()?;
                    let options = body.u8()?;
                    filters.push((filter, options & 0x03));
                }
                if filters.is_empty() {
                    return malformed("SUBSCRIBE without a topic filter");
                }
                Packet::Subscribe { packet_id, filters }
            } else {
                let mut filters = Vec::new();
                while !body.is_empty() {
                    filters.push(body.string()?);
                }
                if filters.is_empty() {
                    return malformed("UNSUBSCRIBE without a topic filter");
                }
                Packet::Unsubscribe { packet_id, filters }
            }
        }
        12 => Packet::PingReq,
        14 => Packet::Disconnect,
        other => return malformed(format!("packet type {other} is not one a client sends")),
    };
    Ok(packet)
}

/// A packet of `first` byte and body, framed.
fn frame(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    encode_length(body.len(), &mut out);
    out.extend_from_slice(body);
    out
}

/// CONNACK, without a session present: `20 02 00 rc` (3.1.1) or
/// `20 03 00 rc 00` (5, no properties).
pub(crate) fn connack(v5: bool, code: u8) -> Vec<u8> {
    if v5 {
        frame(0x20, &[0, code, 0])
    } else {
        frame(0x20, &[0, code])
    }
}

/// PUBACK (0x40), PUBREC (0x50), PUBREL (0x62) or PUBCOMP (0x70) for a
/// packet id; success, so MQTT 5 may omit the reason code as well.
pub(crate) fn ack(first: u8, packet_id: u16) -> Vec<u8> {
    frame(first, &packet_id.to_be_bytes())
}

pub(crate) const PUBACK: u8 = 0x40;
pub(crate) const PUBREC: u8 = 0x50;
pub(crate) const PUBCOMP: u8 = 0x70;

/// SUBACK with one return code (the granted QoS) per filter.
pub(crate) fn suback(v5: bool, packet_id: u16, codes: &[u8]) -> Vec<u8> {
    let mut body = packet_id.to_be_bytes().to_vec();
    if v5 {
        body.push(0);
    }
    body.extend_from_slice(codes);
    frame(0x90, &body)
}

/// UNSUBACK; MQTT 5 gives one success code per filter.
pub(crate) fn unsuback(v5: bool, packet_id: u16, filters: usize) -> Vec<u8> {
    let mut body = packet_id.to_be_bytes().to_vec();
    if v5 {
        body.push(0);
        body.extend(std::iter::repeat_n(0u8, filters));
    }
    frame(0xb0, &body)
}

pub(crate) const PINGRESP: [u8; 2] = [0xd0, 0x00];

/// Client-side encoders, for the tests.
#[cfg(test)]
pub(crate) mod client {
    use super::*;

    fn string(s: &str, out: &mut Vec<u8>) {
        out.extend_from_slice(&(s.len() as u16).to_be_bytes());
        out.extend_from_slice(s.as_bytes());
    }

    /// CONNECT with a clean session and no will, user or password.
    pub(crate) fn connect(level: u8, client_id: &str, keep_alive: u16) -> Vec<u8> {
        let mut body = Vec::new();
        string("MQTT", &mut body);
        body.push(level);
        body.push(0x02);
        body.extend_from_slice(&keep_alive.to_be_bytes());
        if level == LEVEL_5 {
            body.push(0);
        }
        string(client_id, &mut body);
        frame(0x10, &body)
    }

    pub(crate) fn publish(v5: bool, qos: u8, packet_id: u16, topic: &str, payload: &[u8]) -> Vec<u8> {
        let mut body = Vec::new();
        string(topic, &mut body);
        if qos > 0 {
            body.extend_from_slice(&packet_id.to_be_bytes());
        }
        if v5 {
            body.push(0);
        }
        body.extend_from_slice(payload);
        frame(0x30 | (qos << 1), &body)
    }

    pub(crate) fn subscribe(v5: bool, packet_id: u16, filters: &[(&str, u8)]) -> Vec<u8> {
        let mut body = packet_id.to_be_bytes().to_vec();
        if v5 {
            body.push(0);
        }
        for (filter, qos) in filters {
            string(filter, &mut body);
            body.push(*qos);
        }
        frame(0x82, &body)
    }

    pub(crate) const PINGREQ: [u8; 2] = [0xc0, 0x00];
    pub(crate) const DISCONNECT: [u8; 2] = [0xe0, 0x00];
}

#[cfg(test)]
mod tests {
    use super::client;
    use super::*;

    async fn read_one(bytes: &[u8]) -> Result<Option<(u8, Vec<u8>)>, MqttError> {
        let mut reader = bytes;
        read_frame(&mut reader).await
    }

    #[test]
    fn remaining_length_encoding() {
        let cases: [(usize, &[u8]); 6] = [
            (0, &[0x00]),
            (127, &[0x7f]),
            (128, &[0x80, 0x01]),
            (16_383, &[0xff, 0x7f]),
            (16_384, &[0x80, 0x80, 0x01]),
            (268_435_455, &[0xff, 0xff, 0xff, 0x7f]),
        ];
        for (n, bytes) in cases {
            let mut out = Vec::new();
            encode_length(n, &mut out);
            assert_eq!(out, bytes, "{n}");
        }
    }

    #[tokio::test]
    async fn frames_and_limits() {
        let (first, body) = read_one(&[0xc0, 0x00]).await.unwrap().unwrap();
        assert_eq!((first, body.len()), (0xc0, 0));
        let mut long = vec![0x30, 0x80, 0x01];
        long.extend(std::iter::repeat_n(7u8, 128));
        let (_, body) = read_one(&long).await.unwrap().unwrap();
        assert_eq!(body, vec![7u8; 128]);
        assert!(read_one(&[]).await.unwrap().is_none());
        assert!(matches!(read_one(&[0x30, 0x05, 0x00]).await, Err(MqttError::Io(_))));
        assert!(matches!(
            read_one(&[0x30, 0xff, 0xff, 0xff, 0x7f]).await,
            Err(MqttError::TooLarge(268_435_455))
        ));
        assert!(matches!(
            read_one(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01]).await,
            Err(MqttError::Malformed(_))
        ));
    }

    #[tokio::test]
    async fn parses_what_clients_send() {
        for (level, v5) in [(LEVEL_3_1_1, false), (LEVEL_5, true)] {
            let (first, body) = read_one(&client::connect(level, "dev-1", 30)).await.unwrap().unwrap();
            assert_eq!(
                parse(first, &body, false).unwrap(),
                Packet::Connect {
                    level,
                    client_id: "dev-1".into(),
                    keep_alive: 30
                }
            );
            let (first, body) = read_one(&client::publish(v5, 1, 9, "t/1", b"hi"))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(
                parse(first, &body, v5).unwrap(),
                Packet::Publish {
                    qos: 1,
                    packet_id: Some(9),
                    topic: "t/1".into(),
                    payload: b"hi".to_vec()
                }
            );
            let (first, body) = read_one(&client::subscribe(v5, 3, &[("a/#", 1), ("b", 2)]))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(
                parse(first, &body, v5).unwrap(),
                Packet::Subscribe {
                    packet_id: 3,
                    filters: vec![("a/#".into(), 1), ("b".into(), 2)]
                }
            );
        }
        let (first, body) = read_one(&client::publish(false, 0, 0, "t", b""))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            parse(first, &body, false).unwrap(),
            Packet::Publish {
                qos: 0,
                packet_id: None,
                topic: "t".into(),
                payload: vec![]
            }
        );
        assert_eq!(parse(0xc0, &[], false).unwrap(), Packet::PingReq);
        assert_eq!(parse(0xe0, &[], false).unwrap(), Packet::Disconnect);
        assert_eq!(parse(0x62, &[0, 5], false).unwrap(), Packet::PubRel(5));
        assert_eq!(
            parse(0xa2, &[0, 4, 0, 1, b'x'], false).unwrap(),
            Packet::Unsubscribe {
                packet_id: 4,
                filters: vec!["x".into()]
            }
        );
        // A broker-only packet, reserved flags, QoS 3 and a bad name are refused.
        assert!(parse(0x20, &[0, 0], false).is_err());
        assert!(parse(0x80, &[0, 1, 0, 1, b'x', 0], false).is_err());
        assert!(parse(0x36, &[0, 1, b't', 0, 1], false).is_err());
        assert!(parse(0x10, &[0, 4, b'H', b'T', b'T', b'P', 4, 2, 0, 0, 0, 0], false).is_err());
    }

    #[test]
    fn broker_answers() {
        assert_eq!(connack(false, 0), [0x20, 0x02, 0x00, 0x00]);
        assert_eq!(connack(true, 0), [0x20, 0x03, 0x00, 0x00, 0x00]);
        assert_eq!(connack(false, UNACCEPTABLE_PROTOCOL_VERSION), [0x20, 0x02, 0x00, 0x01]);
        assert_eq!(ack(PUBACK, 0x0102), [0x40, 0x02, 0x01, 0x02]);
        assert_eq!(suback(false, 7, &[1, 0]), [0x90, 0x04, 0x00, 0x07, 0x01, 0x00]);
        assert_eq!(suback(true, 7, &[1]), [0x90, 0x04, 0x00, 0x07, 0x00, 0x01]);
        assert_eq!(unsuback(false, 7, 2), [0xb0, 0x02, 0x00, 0x07]);
        assert_eq!(unsuback(true, 7, 2), [0xb0, 0x05, 0x00, 0x07, 0x00, 0x00, 0x00]);
        assert_eq!(PINGRESP, [0xd0, 0x00]);
    }
}
