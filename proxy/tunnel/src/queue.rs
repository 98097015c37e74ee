//! The device smoltcp sees: a pair of packet queues, no I/O.

use std::collections::VecDeque;

use smoltcp::phy::{Device, DeviceCapabilities, Medium, RxToken, TxToken};

/// Buffers kept for reuse: enough for a burst of segments, not a whole window's worth.
const MAX_SPARE: usize = 64;

/// The device smoltcp sees: packets decrypted from the peer, and packets for it to encrypt.
pub(crate) struct Queue {
    rx: VecDeque<Vec<u8>>,
    /// Packets smoltcp produced, to encrypt.
    pub(crate) tx: VecDeque<Vec<u8>>,
    spare: Vec<Vec<u8>>,
    mtu: usize,
}

impl Queue {
    /// An empty queue for packets of at most `mtu` bytes.
    pub(crate) fn new(mtu: usize) -> Self {
        Self {
            rx: VecDeque::new(),
            tx: VecDeque::new(),
            spare: Vec::new(),
            mtu,
        }
    }

    /// Gives a sent packet's buffer back for reuse. The spares are bounded, so that one large
    /// burst (a window's worth of segments) is not kept for the link's lifetime.
    pub(crate) fn recycle(&mut self, buf: Vec<u8>) {
        if self.spare.len() < MAX_SPARE {
            self.spare.push(buf);
        }
    }

    /// A decrypted packet for smoltcp to receive.
    pub(crate) fn push_rx(&mut self, packet: &[u8]) {
        let mut buf = self.spare.pop().unwrap_or_default();
        buf.clear();
        buf.extend_from_slice(packet);
        self.rx.push_back(buf);
    }
}

/// A received packet, for smoltcp.
pub(crate) struct Rx(Vec<u8>);
/// Room for a packet smoltcp sends.
pub(crate) struct Tx<'a> {
    tx: &'a mut VecDeque<Vec<u8>>,
    spare: &'a mut Vec<Vec<u8>>,
}

impl RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = self.spare.pop().unwrap_or_default();
        buf.clear();
        buf.resize(len, 0);
        let r = f(&mut buf);
        self.tx.push_back(buf);
        r
    }
}

impl Device for Queue {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;

    fn receive(
        &mut self,
        _: smoltcp::time::Instant,
    ) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let p = self.rx.pop_front()?;
        Some((
            Rx(p),
            Tx {
                tx: &mut self.tx,
                spare: &mut self.spare,
            },
        ))
    }

    fn transmit(&mut self, _: smoltcp::time::Instant) -> Option<Self::TxToken<'_>> {
        Some(Tx {
            tx: &mut self.tx,
            spare: &mut self.spare,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.mtu;
        caps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_of_sent_packets_leaves_a_bounded_number_of_spare_buffers() {
        let mut q = Queue::new(1420);
        for _ in 0..10_000 {
            let tx = q.transmit(smoltcp::time::Instant::ZERO).unwrap();
            tx.consume(1400, |b| b.fill(1));
        }
        while let Some(sent) = q.tx.pop_front() {
            q.recycle(sent);
        }
        assert!(q.spare.len() <= MAX_SPARE, "{} spares kept", q.spare.len());
    }
}
