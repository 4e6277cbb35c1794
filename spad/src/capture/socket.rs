//! Opening one AF_PACKET capture socket, and the few socket options no safe crate covers.
//!
//! socket2 creates the socket and attaches the BPF program. What is left unsafe is three
//! small blocks, each tested below: the `sockaddr_ll` for `bind`, `setsockopt` with a plain
//! value (the ring version and request) and `PACKET_STATISTICS` (a two-counter struct the
//! kernel fills).

use std::io;
use std::os::fd::AsRawFd;

use socket2::{Domain, SockAddr, SockFilter, Socket, Type};

use super::bpf::Insn;

/// Creates an unbound `SOCK_DGRAM` packet socket with `program` attached. It is created with protocol 0, which receives nothing: only
/// [`bind`] starts the capture, after the caller has set up everything else (the ring), so
/// the filter is in place before the first frame is queued and no unfiltered frame ever
/// reaches us.
pub fn create(program: &[Insn]) -> io::Result<Socket> {
    let socket = Socket::new(Domain::PACKET, Type::DGRAM.cloexec(), None)?;
    let filter: Vec<SockFilter> = program
        .iter()
        .map(|i| SockFilter::new(i.code, i.jt, i.jf, i.k))
        .collect();
    socket.attach_filter(&filter)?;
    Ok(socket)
}

/// Starts the capture: binds to every protocol on `ifindex` (0 = every interface).
pub fn bind(socket: &Socket, ifindex: u32) -> io::Result<()> {
    socket.bind(&link_address(ifindex))
}

/// The `sockaddr_ll` that binds a packet socket to every protocol on `ifindex`.
fn link_address(ifindex: u32) -> SockAddr {
    let address = libc::sockaddr_ll {
        sll_family: libc::AF_PACKET as u16,
        sll_protocol: (libc::ETH_P_ALL as u16).to_be(),
        sll_ifindex: ifindex as i32,
        sll_hatype: 0,
        sll_pkttype: 0,
        sll_halen: 0,
        sll_addr: [0; 8],
    };
    // SAFETY: the storage handed to the closure is a zeroed `sockaddr_storage`, large and
    // aligned enough for a `sockaddr_ll`; we write a whole one and set the length to its
    // size, so family, length and contents agree as `try_init` requires.
    let ((), address) = unsafe {
        SockAddr::try_init(|storage, length| {
            storage.cast::<libc::sockaddr_ll>().write(address);
            *length = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            Ok(())
        })
    }
    .unwrap_or_else(|_: io::Error| unreachable!("the closure cannot fail"));
    address
}

/// `setsockopt` with a plain-data value (an `int`, a `tpacket_req`).
pub fn set_option<T: Copy>(socket: &Socket, level: i32, name: i32, value: &T) -> io::Result<()> {
    // SAFETY: the pointer and length describe `value`, a live `T` of plain data (the callers
    // pass C integers and C structs), for the whole call; the kernel only reads it.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The kernel's counters since the last call (reading resets them): frames that passed the
/// filter, and how many of those were dropped because the receive queue was full.
pub fn take_statistics(socket: &Socket) -> io::Result<(u32, u32)> {
    let mut stats = libc::tpacket_stats {
        tp_packets: 0,
        tp_drops: 0,
    };
    let mut length = std::mem::size_of::<libc::tpacket_stats>() as libc::socklen_t;
    // SAFETY: the pointer and length describe `stats`, a live tpacket_stats; the kernel
    // writes at most `length` bytes and updates `length`.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_STATISTICS,
            (&mut stats as *mut libc::tpacket_stats).cast(),
            &mut length,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((stats.tp_packets, stats.tp_drops))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_link_address_is_a_whole_sockaddr_ll() {
        let address = link_address(7);
        assert_eq!(address.family(), libc::AF_PACKET as libc::sa_family_t);
        assert_eq!(
            address.len() as usize,
            std::mem::size_of::<libc::sockaddr_ll>()
        );
        // SAFETY: (test) the storage holds the sockaddr_ll written above.
        let ll = unsafe { &*address.as_ptr().cast::<libc::sockaddr_ll>() };
        assert_eq!(ll.sll_ifindex, 7);
        assert_eq!(u16::from_be(ll.sll_protocol), libc::ETH_P_ALL as u16);
    }

    /// Needs CAP_NET_RAW: skipped (with a line saying so) when not root.
    #[test]
    fn options_round_trip_on_a_real_packet_socket() {
        let program = crate::capture::bpf::program(&[], false).unwrap();
        let socket = match create(&program) {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                eprintln!("skipped: opening an AF_PACKET socket needs CAP_NET_RAW");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        set_option(
            &socket,
            libc::SOL_PACKET,
            libc::PACKET_VERSION,
            &1 as &libc::c_int,
        )
        .unwrap();
        let mut value: libc::c_int = -1;
        let mut length = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: (test) reads back an int option into a live c_int.
        let rc = unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_VERSION,
                (&mut value as *mut libc::c_int).cast(),
                &mut length,
            )
        };
        assert_eq!((rc, value), (0, 1), "set_option wrote TPACKET_V2");
        bind(&socket, 0).unwrap();
        // An empty watch list rejects everything: nothing passed, nothing dropped.
        assert_eq!(take_statistics(&socket).unwrap(), (0, 0));
    }
}
