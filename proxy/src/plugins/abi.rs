//! The Proxy-Wasm ABI's plain data: status codes, enums, and the encodings of header maps and
//! property paths, without wasmtime (so that it can be tested and fuzzed alone).

/// Proxy-Wasm status codes (what every host call returns).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum Status {
    /// Success.
    Ok = 0,
    /// No such key, header, property or context.
    NotFound = 1,
    /// A bad argument (unknown map or buffer type, bad range).
    BadArgument = 2,
    /// A value that cannot be serialized.
    SerializationFailure = 3,
    /// A value that cannot be parsed.
    ParseFailure = 4,
    /// A pointer or length outside the plugin's memory.
    InvalidMemoryAccess = 6,
    /// Nothing there (an empty buffer or queue).
    Empty = 7,
    /// Compare-and-swap lost a race.
    CasMismatch = 8,
    /// Anything else, including what this host does not offer (never `Unimplemented`, which
    /// the Rust SDK turns into a trap).
    InternalFailure = 10,
    /// An HTTP call that failed (`proxy_get_status` in its callback).
    BrokenConnection = 11,
}

/// What a plugin's phase callback asks of the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Go on to the next plugin and phase.
    Continue,
    /// Stop here (the plugin sent a local response, or wants more of the body).
    Pause,
}

impl Action {
    /// From the callback's return value.
    pub fn from_raw(v: i32) -> Self {
        if v == 0 {
            Self::Continue
        } else {
            Self::Pause
        }
    }
}

/// Header maps a plugin can address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapType {
    /// The request's headers.
    RequestHeaders,
    /// The request's trailers (empty unless a plugin adds some).
    RequestTrailers,
    /// The response's headers.
    ResponseHeaders,
    /// The response's trailers (empty unless a plugin adds some).
    ResponseTrailers,
    /// An HTTP call's answer's headers (`:status` first), in its callback; a gRPC stream's
    /// initial metadata, in its callback.
    CallResponseHeaders,
    /// An HTTP call's answer's trailers, in its callback; a gRPC stream's trailing metadata,
    /// in its callback.
    CallResponseTrailers,
}

impl MapType {
    /// From the ABI's number; `None` past the last map the ABI defines.
    pub fn from_raw(v: i32) -> Option<Self> {
        Some(match v {
            0 => Self::RequestHeaders,
            1 => Self::RequestTrailers,
            2 => Self::ResponseHeaders,
            3 => Self::ResponseTrailers,
            // The gRPC receive maps are the callback's answer, like an HTTP call's.
            4 | 6 => Self::CallResponseHeaders,
            5 | 7 => Self::CallResponseTrailers,
            _ => return None,
        })
    }
}

/// Buffers a plugin can address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BufferType {
    /// The request body.
    RequestBody,
    /// The response body chunk being passed.
    ResponseBody,
    /// The VM configuration (empty here).
    VmConfiguration,
    /// The plugin's `config` from the edge's configuration.
    PluginConfiguration,
    /// An HTTP call's answer's body, or a gRPC call's reply message, in its callback.
    CallResponseBody,
    /// A buffer of the ABI that an HTTP request here never has (TCP stream data, call data).
    Absent,
}

impl BufferType {
    /// From the ABI's number; `None` past the last type the ABI defines (`CallData`, 8).
    pub fn from_raw(v: i32) -> Option<Self> {
        Some(match v {
            0 => Self::RequestBody,
            1 => Self::ResponseBody,
            6 => Self::VmConfiguration,
            7 => Self::PluginConfiguration,
            4 | 5 => Self::CallResponseBody,
            2 | 3 | 8 => Self::Absent,
            _ => return None,
        })
    }
}

/// What `proxy_set_buffer_bytes(start, length, data)` does to `buffer`, by Envoy's rule
/// (`Buffer::copyFrom`): at `start` 0, drop the first `length` bytes and put `data` in front
/// (so `0, len` replaces all, `0, 0` prepends); at or past the end, append; anywhere else,
/// `BadArgument`.
pub fn splice(buffer: &[u8], start: usize, length: usize, data: &[u8]) -> Result<Vec<u8>, Status> {
    let mut out;
    if start == 0 {
        let rest = &buffer[length.min(buffer.len())..];
        out = Vec::with_capacity(data.len() + rest.len());
        out.extend_from_slice(data);
        out.extend_from_slice(rest);
    } else if start >= buffer.len() {
        out = Vec::with_capacity(buffer.len() + data.len());
        out.extend_from_slice(buffer);
        out.extend_from_slice(data);
    } else {
        return Err(Status::BadArgument);
    }
    Ok(out)
}

/// The part of a buffer `proxy_get_buffer_bytes(start, length)` reads, by proxy-wasm-cpp-host's
/// rule: clamped to the buffer (nothing when `start` is past its end); `None` when `start +
/// length` overflows.
pub fn window(buffer: &[u8], start: u32, length: u32) -> Option<&[u8]> {
    let end = start.checked_add(length)?;
    let (start, end) = (start as usize, end as usize);
    if start > buffer.len() {
        return Some(&[]);
    }
    Some(&buffer[start..end.min(buffer.len())])
}

/// A header map: names lowercase, values as bytes, in order.
pub type Headers = Vec<(String, Vec<u8>)>;

/// Encodes `pairs` the way every Proxy-Wasm SDK reads a map: the count, each pair's two
/// lengths, then each name and value followed by a NUL (all integers u32 little-endian).
pub fn encode_map<'a>(pairs: impl Iterator<Item = (&'a str, &'a [u8])> + Clone) -> Vec<u8> {
    let n = pairs.clone().count();
    let size: usize = 4 + pairs
        .clone()
        .map(|(k, v)| 10 + k.len() + v.len())
        .sum::<usize>();
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&(n as u32).to_le_bytes());
    for (k, v) in pairs.clone() {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v);
        out.push(0);
    }
    out
}

/// Decodes a map a plugin wrote; `None` when it is malformed (the call then fails with
/// `ParseFailure`; nothing a plugin sends can panic the host).
pub fn decode_map(bytes: &[u8]) -> Option<Headers> {
    if bytes.is_empty() {
        return Some(Vec::new());
    }
    let u32_at = |at: usize| -> Option<usize> {
        Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?) as usize)
    };
    let n = u32_at(0)?;
    // Each pair takes at least 10 bytes: a count beyond that is a lie.
    if n > bytes.len() / 10 {
        return None;
    }
    let mut pos = 4 + n * 8;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let (kl, vl) = (u32_at(4 + i * 8)?, u32_at(8 + i * 8)?);
        let key = bytes.get(pos..pos.checked_add(kl)?)?;
        pos = pos.checked_add(kl + 1)?;
        let value = bytes.get(pos..pos.checked_add(vl)?)?;
        pos = pos.checked_add(vl + 1)?;
        out.push((
            std::str::from_utf8(key).ok()?.to_ascii_lowercase(),
            value.to_vec(),
        ));
    }
    Some(out)
}

/// Splits a property path (segments separated by NUL, as the SDKs send them) into a dotted name:
/// `["request", "path"]` → `request.path`.
pub fn property_name(path: &[u8]) -> Option<String> {
    let s = std::str::from_utf8(path).ok()?;
    if s.is_empty() {
        return None;
    }
    Some(s.split('\0').collect::<Vec<_>>().join("."))
}

/// True for a header name a plugin may set: a valid HTTP token.
pub fn valid_header_name(name: &str) -> bool {
    !name.is_empty() && http::HeaderName::from_bytes(name.as_bytes()).is_ok()
}

/// True for a header value a plugin may set (no CR, LF or NUL).
pub fn valid_header_value(value: &[u8]) -> bool {
    http::HeaderValue::from_bytes(value).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_spliced_and_read_as_envoy_does() {
        let b = b"hello";
        assert_eq!(splice(b, 0, 5, b"bye").unwrap(), b"bye");
        assert_eq!(splice(b, 0, 0, b">").unwrap(), b">hello");
        assert_eq!(splice(b, 0, 2, b"J").unwrap(), b"Jllo");
        assert_eq!(splice(b, 0, 99, b"x").unwrap(), b"x");
        assert_eq!(splice(b, 5, 0, b"!").unwrap(), b"hello!");
        assert_eq!(splice(b, 70, 3, b"!").unwrap(), b"hello!");
        assert_eq!(splice(b, 2, 1, b"x"), Err(Status::BadArgument));
        assert_eq!(window(b, 1, 3), Some(&b"ell"[..]));
        assert_eq!(window(b, 3, 99), Some(&b"lo"[..]));
        assert_eq!(window(b, 9, 1), Some(&b""[..]));
        assert_eq!(window(b, u32::MAX, 2), None);
    }

    #[test]
    fn maps_round_trip_like_the_sdk_encodes_them() {
        // The SDK's own test vector.
        let sdk: &[u8] = &[
            2, 0, 0, 0, 7, 0, 0, 0, 3, 0, 0, 0, 5, 0, 0, 0, 1, 0, 0, 0, b':', b'm', b'e', b't',
            b'h', b'o', b'd', 0, b'G', b'E', b'T', 0, b':', b'p', b'a', b't', b'h', 0, b'/', 0,
        ];
        let m = decode_map(sdk).unwrap();
        assert_eq!(
            m,
            vec![
                (":method".into(), b"GET".to_vec()),
                (":path".into(), b"/".to_vec())
            ]
        );
        let again = encode_map(m.iter().map(|(k, v)| (k.as_str(), v.as_slice())));
        assert_eq!(again, sdk);
        assert!(decode_map(&[9, 0, 0, 0]).is_none());
        assert!(decode_map(&[1, 0, 0, 0, 255, 255, 255, 255, 0, 0, 0, 0]).is_none());
        assert_eq!(decode_map(&[]).unwrap(), vec![]);
        assert_eq!(property_name(b"request\0path").unwrap(), "request.path");
    }
}
