//! The Proxy-Wasm host calls driven with arbitrary pointers, lengths and values: a module that
//! imports every host call is instantiated once; each input picks a call and its arguments
//! (and sometimes writes plugin memory first). Traps are allowed; panics are not.
#![no_main]

use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use moltghost::plugins::host::{self, Exchange, Shared, Vm};

static VM: LazyLock<(Mutex<Vm>, usize)> = LazyLock::new(|| {
    let engine = moltghost::plugins::engine();
    let compiled = host::compile(engine, host::host_call_module().as_bytes(), 4 << 20).unwrap();
    // An upstream named by one byte, so that calls out get past the name now and then.
    let upstreams = [(
        "a".to_string(),
        url::Url::parse("http://127.0.0.1:9").unwrap(),
    )];
    let shared = Arc::new(
        Shared::new("fuzz", b"{\"a\":1}".to_vec()).with_upstreams(upstreams.into_iter().collect()),
    );
    let vm = compiled
        .instantiate(engine, shared, Duration::from_millis(100))
        .unwrap();
    (Mutex::new(vm), host::host_calls().len())
});

fuzz_target!(|data: &[u8]| {
    let (vm, calls) = &*VM;
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let mut args = [0i64; 12];
    for (i, chunk) in rest.chunks(4).take(12).enumerate() {
        let mut b = [0u8; 4];
        b[..chunk.len()].copy_from_slice(chunk);
        // Small values are the interesting ones for lengths and map types; keep some wild.
        let v = i32::from_le_bytes(b);
        args[i] = if pick & 0x80 == 0 {
            i64::from(v % 70_000)
        } else {
            i64::from(v)
        };
    }
    let mut ex = Exchange {
        request_headers: vec![
            (":path".into(), b"/v1/chat".to_vec()),
            ("x".into(), b"y".to_vec()),
        ],
        request_body: rest.to_vec().into(),
        response_body: b"answer".to_vec().into(),
        ..Exchange::default()
    };
    let mut vm = vm.lock().unwrap();
    let _ = vm.call_raw(&format!("call_{}", pick as usize % calls), &args, &mut ex);
});
