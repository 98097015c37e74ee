//! The WebSocket bridge's input on arbitrary bytes: frames decoded by the server codec with the
//! edge's settings (masked frames required, size limits), each text message parsed as a client
//! message; and the subprotocol header's parsing.
#![no_main]

use std::io::{self, Read, Write};

use libfuzzer_sys::fuzz_target;
use moltghost_protocol::ws::{self, ClientMessage};
use tungstenite::protocol::{Role, WebSocket, WebSocketConfig};
use tungstenite::Message;

/// The client's bytes, then `WouldBlock`, as the bridge's buffer behaves.
struct Wire(io::Cursor<Vec<u8>>, Vec<u8>);

impl Read for Wire {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.0.read(buf)? {
            0 if !buf.is_empty() => Err(io::ErrorKind::WouldBlock.into()),
            n => Ok(n),
        }
    }
}

impl Write for Wire {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.1.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let offer = ws::offer([data]);
    if let Some(key) = offer.key {
        assert!(!key.contains(','));
    }
    let config = WebSocketConfig::default()
        .max_message_size(Some(64 * 1024))
        .max_frame_size(Some(64 * 1024));
    let mut socket = WebSocket::from_raw_socket(
        Wire(io::Cursor::new(data.to_vec()), Vec::new()),
        Role::Server,
        Some(config),
    );
    for _ in 0..64 {
        match socket.read() {
            Ok(Message::Text(t)) => {
                if let Ok(ClientMessage::Message(req)) = ClientMessage::parse(t.as_bytes()) {
                    assert!(!req.messages.is_empty());
                }
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    let _ = ClientMessage::parse(data);
});
