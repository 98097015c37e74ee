//! A TUN device for the pod's `--tun` mode: decrypted packets go to the pod's kernel, whose TCP
//! carries the connections (and recovers from loss faster than smoltcp, whose retransmit timeout
//! cannot go under 1 s); what the kernel answers is read back and encrypted. Needs
//! `CAP_NET_ADMIN` and iproute2 (`ip`) to configure the address.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use tokio::io::unix::AsyncFd;

/// An open TUN device, configured and up.
pub struct TunDevice {
    fd: AsyncFd<OwnedFd>,
    name: String,
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl TunDevice {
    /// Creates device `name` with address `cidr` (e.g. `10.7.0.2/24`) and `mtu`, and brings it
    /// up. Must be called on a tokio runtime.
    pub fn create(name: &str, cidr: &str, mtu: usize) -> io::Result<Self> {
        if name.is_empty()
            || name.len() >= libc::IFNAMSIZ
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(io::Error::other(format!("bad TUN device name {name:?}")));
        }
        // SAFETY: a constant path; the result is checked.
        let raw = unsafe {
            libc::open(
                c"/dev/net/tun".as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a descriptor we just opened and own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF takes a struct ifreq, which `IfReq` lays out (name, flags, padding).
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
            return Err(io::Error::last_os_error());
        }
        for args in [
            vec!["addr", "add", cidr, "dev", name],
            vec!["link", "set", name, "mtu", &mtu.to_string(), "up"],
        ] {
            let out = std::process::Command::new("ip").args(&args).output()?;
            if !out.status.success() {
                return Err(io::Error::other(format!(
                    "ip {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
        }
        // SAFETY: an `OwnedFd` always returns the descriptor it owns, which stays open until
        // the `AsyncFd` (which owns it) is dropped.
        let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
            .map_err(|e| io::Error::other(e.to_string()))?;
        Ok(Self {
            fd,
            name: name.to_owned(),
        })
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Hands one packet to the kernel (dropped if its queue is full: TCP resends).
    pub fn write(&self, packet: &[u8]) {
        // SAFETY: a valid descriptor and a readable buffer of the given length.
        let _ = unsafe {
            libc::write(
                self.fd.get_ref().as_raw_fd(),
                packet.as_ptr().cast(),
                packet.len(),
            )
        };
    }

    /// Reads the kernel's packets for ever, handing each to `deliver`.
    pub async fn read_loop(&self, mut deliver: impl FnMut(&[u8])) {
        let mut buf = vec![0u8; 65_536];
        loop {
            let Ok(mut ready) = self.fd.readable().await else {
                return;
            };
            loop {
                // SAFETY: a valid descriptor and a writable buffer of the given length.
                let n = unsafe {
                    libc::read(
                        self.fd.get_ref().as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                    )
                };
                if n > 0 {
                    deliver(&buf[..n as usize]);
                } else {
                    ready.clear_ready();
                    break;
                }
            }
        }
    }
}
