//! The BPF prefilter on arbitrary packets: the interpreter never panics, and whatever passes
//! the filter also parses in userspace or is harmlessly dropped there.
#![no_main]
use libfuzzer_sys::fuzz_target;
use spad::capture::bpf::{program, run, Watch};
use spad::net::Proto;

fuzz_target!(|data: &[u8]| {
    let watches = [Watch { proto: Proto::Udp, low: 62201, high: 62201 }, Watch { proto: Proto::Tcp, low: 7000, high: 9000 }];
    let prog = program(&watches, true).expect("small program");
    for protocol in [0x0800u16, 0x86dd] {
        if run(&prog, protocol, data) > 0 {
            let _ = spad::capture::frame::parse(data);
        }
    }
});
