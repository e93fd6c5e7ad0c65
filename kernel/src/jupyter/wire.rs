//! Jupyter wire format: `[ids…, "<IDS|MSG>", signature, header, parent, metadata, content,
//! buffers…]`, signed with HMAC over the four dicts only (buffers are not signed, as in the spec
//! and jupyter_client; evcxr_jupyter wrongly signs them too).

use bytes::Bytes;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};

pub const DELIMITER: &[u8] = b"<IDS|MSG>";
pub const PROTOCOL_VERSION: &str = "5.3";

#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// ROUTER routing identities (empty for iopub, where the first frame is the topic).
    pub identities: Vec<Bytes>,
    pub header: Value,
    pub parent_header: Value,
    pub metadata: Value,
    pub content: Value,
    pub buffers: Vec<Bytes>,
}

impl Message {
    pub fn msg_type(&self) -> &str {
        self.header.get("msg_type").and_then(Value::as_str).unwrap_or("")
    }
    pub fn msg_id(&self) -> &str {
        self.header.get("msg_id").and_then(Value::as_str).unwrap_or("")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireError {
    NoDelimiter,
    TooFewFrames(usize),
    BadSignature,
    BadJson(&'static str, String),
    BadHeader(String),
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WireError::NoDelimiter => write!(f, "no <IDS|MSG> delimiter"),
            WireError::TooFewFrames(n) => write!(f, "truncated message: {n} frames after the delimiter, 5 needed"),
            WireError::BadSignature => write!(f, "bad or missing HMAC signature"),
            WireError::BadJson(part, e) => write!(f, "{part} is not valid JSON: {e}"),
            WireError::BadHeader(e) => write!(f, "bad header: {e}"),
        }
    }
}

impl std::error::Error for WireError {}

#[derive(Clone)]
enum Algo {
    None,
    Sha256(Vec<u8>),
    Sha512(Vec<u8>),
}

/// Signs and verifies messages per the connection file's `key` and `signature_scheme`.
#[derive(Clone)]
pub struct Signer {
    algo: Algo,
}

impl Signer {
    /// An empty key disables signing (allowed by the spec for trusted local setups).
    pub fn new(scheme: &str, key: &str) -> anyhow::Result<Signer> {
        if key.is_empty() {
            return Ok(Signer { algo: Algo::None });
        }
        let algo = match scheme {
            "hmac-sha256" | "" => Algo::Sha256(key.as_bytes().to_vec()),
            "hmac-sha512" => Algo::Sha512(key.as_bytes().to_vec()),
            other => anyhow::bail!("unsupported signature_scheme {other:?} (hmac-sha256 and hmac-sha512 are supported)"),
        };
        Ok(Signer { algo })
    }

    pub fn sign(&self, parts: &[&[u8]; 4]) -> String {
        match &self.algo {
            Algo::None => String::new(),
            Algo::Sha256(k) => {
                let mut mac = Hmac::<sha2::Sha256>::new_from_slice(k).expect("HMAC takes any key size");
                parts.iter().for_each(|p| mac.update(p));
                hex::encode(mac.finalize().into_bytes())
            }
            Algo::Sha512(k) => {
                let mut mac = Hmac::<sha2::Sha512>::new_from_slice(k).expect("HMAC takes any key size");
                parts.iter().for_each(|p| mac.update(p));
                hex::encode(mac.finalize().into_bytes())
            }
        }
    }

    /// Constant-time comparison, so the key cannot be guessed byte by byte from timings.
    pub fn verify(&self, signature: &[u8], parts: &[&[u8]; 4]) -> bool {
        let Ok(sig) = hex::decode(signature) else { return matches!(self.algo, Algo::None) };
        match &self.algo {
            Algo::None => true,
            Algo::Sha256(k) => {
                let mut mac = Hmac::<sha2::Sha256>::new_from_slice(k).expect("HMAC takes any key size");
                parts.iter().for_each(|p| mac.update(p));
                mac.verify_slice(&sig).is_ok()
            }
            Algo::Sha512(k) => {
                let mut mac = Hmac::<sha2::Sha512>::new_from_slice(k).expect("HMAC takes any key size");
                parts.iter().for_each(|p| mac.update(p));
                mac.verify_slice(&sig).is_ok()
            }
        }
    }
}

fn parse_dict(part: &'static str, b: &[u8]) -> Result<Value, WireError> {
    let v: Value = serde_json::from_slice(b).map_err(|e| WireError::BadJson(part, e.to_string()))?;
    if !v.is_object() {
        return Err(WireError::BadJson(part, "not a JSON object".into()));
    }
    Ok(v)
}

pub fn decode(frames: Vec<Bytes>, signer: &Signer) -> Result<Message, WireError> {
    let delim = frames.iter().position(|f| f.as_ref() == DELIMITER).ok_or(WireError::NoDelimiter)?;
    let rest = &frames[delim + 1..];
    if rest.len() < 5 {
        return Err(WireError::TooFewFrames(rest.len()));
    }
    let parts: [&[u8]; 4] = [&rest[1], &rest[2], &rest[3], &rest[4]];
    // Check the signature before parsing: unauthenticated input is never interpreted.
    if !signer.verify(&rest[0], &parts) {
        return Err(WireError::BadSignature);
    }
    let header = parse_dict("header", &rest[1])?;
    for key in ["msg_id", "msg_type"] {
        if !header.get(key).is_some_and(Value::is_string) {
            return Err(WireError::BadHeader(format!("missing {key}")));
        }
    }
    Ok(Message {
        identities: frames[..delim].to_vec(),
        header,
        parent_header: parse_dict("parent_header", &rest[2])?,
        metadata: parse_dict("metadata", &rest[3])?,
        content: parse_dict("content", &rest[4])?,
        buffers: rest[5..].to_vec(),
    })
}

pub fn encode(msg: &Message, signer: &Signer) -> Vec<Bytes> {
    let header = Bytes::from(msg.header.to_string());
    let parent = Bytes::from(msg.parent_header.to_string());
    let metadata = Bytes::from(msg.metadata.to_string());
    let content = Bytes::from(msg.content.to_string());
    let sig = signer.sign(&[&header, &parent, &metadata, &content]);
    let mut frames = msg.identities.clone();
    frames.push(Bytes::from_static(DELIMITER));
    frames.push(Bytes::from(sig));
    frames.extend([header, parent, metadata, content]);
    frames.extend(msg.buffers.iter().cloned());
    frames
}

/// Creates headers for messages the kernel sends, under the kernel's own session id.
#[derive(Clone)]
pub struct HeaderFactory {
    pub session: String,
}

impl HeaderFactory {
    pub fn new() -> Self {
        HeaderFactory { session: uuid::Uuid::new_v4().to_string() }
    }

    pub fn header(&self, msg_type: &str) -> Value {
        json!({
            "msg_id": uuid::Uuid::new_v4().to_string(),
            "session": self.session,
            "username": "kernel",
            "date": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            "msg_type": msg_type,
            "version": PROTOCOL_VERSION,
        })
    }

    /// A reply or iopub message caused by `parent` (routed back to the same peer for replies).
    pub fn child_of(&self, parent: &Message, msg_type: &str, content: Value) -> Message {
        Message {
            identities: parent.identities.clone(),
            header: self.header(msg_type),
            parent_header: parent.header.clone(),
            metadata: json!({}),
            content,
            buffers: vec![],
        }
    }

    /// An iopub message: no routing identities; the topic frame is added by the publisher.
    pub fn broadcast(&self, parent_header: &Value, msg_type: &str, content: Value) -> Message {
        Message {
            identities: vec![],
            header: self.header(msg_type),
            parent_header: parent_header.clone(),
            metadata: json!({}),
            content,
            buffers: vec![],
        }
    }
}

impl Default for HeaderFactory {
    fn default() -> Self {
        Self::new()
    }
}

/// Jupyter cursor positions count Unicode code points (protocol ≥ 5.2); evcxr wants bytes.
pub fn cursor_to_byte(code: &str, cursor: usize) -> usize {
    code.char_indices().nth(cursor).map(|(b, _)| b).unwrap_or(code.len())
}

pub fn byte_to_cursor(code: &str, byte: usize) -> usize {
    let byte = byte.min(code.len());
    // A byte offset inside a character counts that character as not yet reached.
    code.char_indices().take_while(|(b, _)| *b < byte).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(signer: &Signer) -> Vec<Bytes> {
        let h = HeaderFactory::new();
        let msg = Message {
            identities: vec![Bytes::from_static(b"peer")],
            header: h.header("kernel_info_request"),
            parent_header: json!({}),
            metadata: json!({}),
            content: json!({}),
            buffers: vec![Bytes::from_static(b"raw")],
        };
        encode(&msg, signer)
    }

    #[test]
    fn round_trip_and_buffers_unsigned() {
        let s = Signer::new("hmac-sha256", "secret").unwrap();
        let frames = sample(&s);
        let m = decode(frames.clone(), &s).unwrap();
        assert_eq!(m.msg_type(), "kernel_info_request");
        assert_eq!(m.identities, vec![Bytes::from_static(b"peer")]);
        assert_eq!(m.buffers, vec![Bytes::from_static(b"raw")]);
        // Changing a buffer does not invalidate the signature (buffers are not signed).
        let mut f2 = frames.clone();
        *f2.last_mut().unwrap() = Bytes::from_static(b"other");
        assert!(decode(f2, &s).is_ok());
    }

    #[test]
    fn known_hmac_vector() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        let s = Signer::new("hmac-sha256", "Jefe").unwrap();
        let sig = s.sign(&[b"what do ya ", b"want ", b"for nothing?", b""]);
        assert_eq!(sig, "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
    }

    #[test]
    fn rejects_forged_truncated_and_garbage() {
        let s = Signer::new("hmac-sha256", "secret").unwrap();
        let mut forged = sample(&s);
        forged[2] = Bytes::from_static(b"00112233");
        assert_eq!(decode(forged, &s), Err(WireError::BadSignature));
        let other = Signer::new("hmac-sha256", "other").unwrap();
        assert_eq!(decode(sample(&other), &s), Err(WireError::BadSignature));
        let mut truncated = sample(&s);
        truncated.truncate(4);
        assert!(matches!(decode(truncated, &s), Err(WireError::TooFewFrames(_))));
        assert_eq!(decode(vec![Bytes::from_static(b"x")], &s), Err(WireError::NoDelimiter));
        // Garbage JSON correctly signed is still rejected.
        let parts: [&[u8]; 4] = [b"{not json", b"{}", b"{}", b"{}"];
        let sig = s.sign(&parts);
        let frames = vec![
            Bytes::from_static(DELIMITER),
            Bytes::from(sig),
            Bytes::from_static(b"{not json"),
            Bytes::from_static(b"{}"),
            Bytes::from_static(b"{}"),
            Bytes::from_static(b"{}"),
        ];
        assert!(matches!(decode(frames, &s), Err(WireError::BadJson("header", _))));
    }

    #[test]
    fn empty_key_disables_signing() {
        let s = Signer::new("hmac-sha256", "").unwrap();
        let frames = sample(&s);
        assert_eq!(frames[2].as_ref(), b"");
        assert!(decode(frames, &s).is_ok());
    }

    #[test]
    fn cursor_conversion() {
        let code = "é😀x";
        assert_eq!(cursor_to_byte(code, 0), 0);
        assert_eq!(cursor_to_byte(code, 1), 2);
        assert_eq!(cursor_to_byte(code, 2), 6);
        assert_eq!(cursor_to_byte(code, 3), 7);
        assert_eq!(cursor_to_byte(code, 99), 7);
        for cp in 0..=3 {
            assert_eq!(byte_to_cursor(code, cursor_to_byte(code, cp)), cp);
        }
    }
}
