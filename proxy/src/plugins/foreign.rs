//! Foreign functions (`proxy_call_foreign_function`): the ones proxy-wasm-cpp-host registers
//! for Envoy, `compress` and `uncompress` (zlib's format, as zlib's `compress` and
//! `uncompress`), and Envoy's `clear_route_cache`. A name not offered answers `NotFound`, as on
//! Envoy (the SDKs turn it into an error), and is logged once per plugin and name.

use std::io::Read;

use wasmtime::{Caller, Linker};

use super::abi::Status;
use super::calls::{give, read, write_u32};
use super::host::Host;

/// The largest result `uncompress` gives: a small input must not inflate past what a plugin
/// could hold (past it: `SerializationFailure`, as for input zlib cannot read).
pub const MAX_UNCOMPRESSED: usize = 16 << 20;

/// What a foreign function answers: its result bytes, or a status.
pub fn call(name: &str, args: &[u8]) -> Result<Vec<u8>, Status> {
    match name {
        "compress" => {
            let mut z = flate2::read::ZlibEncoder::new(args, flate2::Compression::default());
            let mut out = Vec::with_capacity(args.len() / 2 + 16);
            z.read_to_end(&mut out)
                .map_err(|_| Status::SerializationFailure)?;
            Ok(out)
        }
        "uncompress" => {
            let z = flate2::read::ZlibDecoder::new(args);
            let mut out = Vec::with_capacity(args.len() * 2 + 2);
            z.take(MAX_UNCOMPRESSED as u64 + 1)
                .read_to_end(&mut out)
                .map_err(|_| Status::SerializationFailure)?;
            if out.len() > MAX_UNCOMPRESSED {
                return Err(Status::SerializationFailure);
            }
            Ok(out)
        }
        // Routes are chosen again after every edit of `:path` or `:method`: nothing is cached.
        "clear_route_cache" => Ok(Vec::new()),
        _ => Err(Status::NotFound),
    }
}

/// Defines `proxy_call_foreign_function(name, name size, args, args size, ret ptr, ret size)`.
pub(super) fn define(l: &mut Linker<Host>) -> wasmtime::Result<()> {
    l.func_wrap(
        "env",
        "proxy_call_foreign_function",
        |mut c: Caller<'_, Host>,
         np: i32,
         nl: i32,
         ap: i32,
         al: i32,
         ret_ptr: i32,
         ret_size: i32|
         -> wasmtime::Result<i32> {
            let (Some(name), Some(args)) = (read(&mut c, np, nl), read(&mut c, ap, al)) else {
                return Ok(Status::InvalidMemoryAccess as i32);
            };
            let name = String::from_utf8_lossy(&name);
            let result = match call(&name, &args) {
                Ok(result) => result,
                Err(Status::NotFound) => {
                    let call = format!("proxy_call_foreign_function({name})");
                    c.data().shared.unsupported(&call, Status::NotFound as i32);
                    return Ok(Status::NotFound as i32);
                }
                Err(status) => return Ok(status as i32),
            };
            // As cpp-host: a caller that wants no result gets only its size.
            if ret_ptr == 0 {
                if ret_size != 0 && write_u32(&mut c, ret_size, result.len() as u32).is_none() {
                    return Ok(Status::InvalidMemoryAccess as i32);
                }
                return Ok(Status::Ok as i32);
            }
            Ok(give(&mut c, &result, ret_ptr, ret_size)? as i32)
        },
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compress_and_uncompress_speak_zlib() {
        let text = b"hello world! hello world! hello world!".repeat(10);
        let z = call("compress", &text).unwrap();
        assert_eq!(&z[..2], &[0x78, 0x9c], "a zlib header at the default level");
        assert!(z.len() < text.len());
        assert_eq!(call("uncompress", &z).unwrap(), text);
        assert_eq!(
            call("uncompress", b"not zlib"),
            Err(Status::SerializationFailure)
        );
        assert_eq!(
            call("compress", b"").map(|z| call("uncompress", &z)),
            Ok(Ok(Vec::new()))
        );
    }

    #[test]
    fn a_bomb_stops_at_the_limit_and_unknown_names_are_not_found() {
        let zeros = vec![0u8; MAX_UNCOMPRESSED + 1];
        let z = call("compress", &zeros).unwrap();
        assert!(z.len() < 64 << 10);
        assert_eq!(call("uncompress", &z), Err(Status::SerializationFailure));
        assert_eq!(call("declare_property", b""), Err(Status::NotFound));
        assert_eq!(call("clear_route_cache", b""), Ok(Vec::new()));
    }
}
