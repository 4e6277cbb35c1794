//! `spa knock --connect HOST:PORT`: after the knock, connect (retrying while the grant lands)
//! and relay stdin/stdout, so ssh can use spa as its `ProxyCommand`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::resolve::{Family, Resolver};

/// Connects to `target` (HOST:PORT) within 5 s and copies stdin to it and it to stdout.
pub fn relay(target: &str, family: Family, resolver: &Resolver) -> anyhow::Result<()> {
    let (host, port) = target
        .rsplit_once(':')
        .context("--connect takes HOST:PORT")?;
    let to = resolver.resolve(host, port.parse().context("--connect port")?, family)?;
    let deadline = Instant::now() + Duration::from_secs(5);
    let stream = loop {
        match TcpStream::connect_timeout(&to, Duration::from_millis(500)) {
            Ok(s) => break s,
            Err(e) if Instant::now() >= deadline => {
                return Err(e).with_context(|| format!("connecting to {to}"))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    let mut upstream = stream.try_clone()?;
    let copier = std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut upstream);
        let _ = upstream.shutdown(std::net::Shutdown::Write);
    });
    let mut downstream = stream;
    let mut stdout = std::io::stdout().lock();
    let mut buf = [0u8; 16384];
    loop {
        let n = downstream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        stdout.write_all(&buf[..n])?;
        stdout.flush()?;
    }
    drop(copier);
    Ok(())
}
