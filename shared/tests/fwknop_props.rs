//! Property tests for the fwknop codec: what `seal` builds, `open` returns unchanged; arbitrary
//! bytes never panic the decoder; any single change to a sealed packet is refused.

use std::net::Ipv4Addr;

use proptest::prelude::*;
use spa_shared::fwknop::{
    message, wire, Access, HmacDigest, Keys, Message, NatTarget, Proto, SealParams,
};

fn digest() -> impl Strategy<Value = HmacDigest> {
    prop_oneof![
        Just(HmacDigest::Sha1),
        Just(HmacDigest::Sha256),
        Just(HmacDigest::Sha384),
        Just(HmacDigest::Sha512)
    ]
}

fn access() -> impl Strategy<Value = Access> {
    (prop_oneof![Just(Proto::Tcp), Just(Proto::Udp)], 1u16..)
        .prop_map(|(proto, port)| Access { proto, port })
}

fn message() -> impl Strategy<Value = Message> {
    (
        "[0-9]{16}",
        "[a-zA-Z0-9_.-]{1,32}",
        any::<u32>(),
        any::<[u8; 4]>(),
        prop::collection::vec(access(), 1..6),
        prop::option::of((any::<[u8; 4]>(), 1u16..)),
        any::<bool>(),
        prop::option::of(any::<u32>()),
    )
        .prop_map(|(random, user, ts, ip, access, nat, local, timeout)| {
            let nat = nat.map(|(a, port)| NatTarget {
                address: Ipv4Addr::from(a),
                port,
            });
            let access = if nat.is_some() {
                access[..1].to_vec()
            } else {
                access
            };
            let mut m = Message::access(u64::from(ts), Ipv4Addr::from(ip), access)
                .with(nat, local, timeout);
            m.random = random;
            m.user = user;
            m
        })
}

proptest! {
    #[test]
    fn seal_then_open_is_identity(
        m in message(),
        enc in prop::collection::vec(any::<u8>(), 1..64),
        mac in prop::collection::vec(any::<u8>(), 1..128),
        d in digest(),
        salt in any::<[u8; 8]>(),
    ) {
        let keys = Keys::new(enc, mac, d).unwrap();
        let packet = wire::seal(&m, &keys, SealParams { salt, hmac: true });
        wire::precheck(packet.as_bytes()).unwrap();
        prop_assert_eq!(wire::open(packet.as_bytes(), &keys).unwrap(), m);
    }

    #[test]
    fn any_changed_character_is_refused(
        m in message(),
        index in any::<prop::sample::Index>(),
        replacement in "[A-Za-z0-9+/]",
    ) {
        let keys = Keys::new(vec![7; 32], vec![8; 64], HmacDigest::Sha256).unwrap();
        let packet = wire::seal(&m, &keys, SealParams { salt: [1; 8], hmac: true });
        let mut bytes = packet.into_bytes();
        let i = index.index(bytes.len());
        let r = replacement.as_bytes()[0];
        prop_assume!(bytes[i] != r);
        bytes[i] = r;
        prop_assert!(wire::open(&bytes, &keys).is_err());
    }

    #[test]
    fn arbitrary_input_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        let keys = Keys::new(vec![7; 32], vec![8; 64], HmacDigest::Sha256).unwrap();
        let _ = wire::precheck(&bytes);
        let _ = wire::open(&bytes, &keys);
        let _ = wire::is_without_hmac(&bytes, &keys);
        let _ = message::parse(&bytes);
    }

    #[test]
    fn arbitrary_plaintext_never_panics(text in "[ -~]{0,300}") {
        let _ = message::parse(text.as_bytes());
    }
}
