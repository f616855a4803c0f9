//! The monitor's parser of the socket addresses a VM passes to `connect` and `sendto`: any
//! bytes (up to `sizeof(struct sockaddr_storage)`, as the monitor copies them) parse without
//! panicking; only absolute unix paths, abstract names and loopback ports are ever routable;
//! the policy object made from a routable address is one that a rule naming it exactly
//! matches; and a rule's translation target never panics.
//!
//! `intercept/address.rs` is private to the monitor (`pub(super)`), so it is compiled here as
//! a module of this crate, unchanged.

#![no_main]

#[allow(dead_code, unused_imports)]
#[path = "../../src/intercept/address.rs"]
mod address;

use address::{Address, Destination, MAX_SOCKADDR};
use libfuzzer_sys::fuzz_target;
use shuttle_policy::{ObjectPattern, Op};

fuzz_target!(|data: &[u8]| {
    // The first byte picks a rule's translation target from the rest, after the address.
    let (addr, target) = match data.iter().position(|b| *b == 0xff) {
        Some(i) => (&data[..i], std::str::from_utf8(&data[i + 1..]).ok()),
        None => (data, None),
    };
    if addr.len() > MAX_SOCKADDR {
        return;
    }
    let parsed = address::parse(addr);
    let family = addr
        .get(..2)
        .map(|b| i32::from(u16::from_ne_bytes([b[0], b[1]])));
    let Address::Routable(dest) = parsed else {
        if family == Some(libc::AF_UNSPEC) {
            assert_eq!(parsed, Address::Unspecified);
        }
        return;
    };
    match &dest {
        Destination::UnixPath(p) => {
            assert_eq!(family, Some(libc::AF_UNIX));
            assert!(p.starts_with('/'), "relative path routed: {p:?}");
            assert!(!p.contains('\0'), "path with a NUL routed: {p:?}");
        }
        Destination::Abstract(_) => {
            assert_eq!(family, Some(libc::AF_UNIX));
            assert_eq!(addr.get(2), Some(&0));
        }
        Destination::Inet { v6: false, port } => {
            assert_eq!(family, Some(libc::AF_INET));
            assert_eq!(addr[4], 127, "non-loopback IPv4 routed");
            assert_eq!(*port, u16::from_be_bytes([addr[2], addr[3]]));
        }
        Destination::Inet { v6: true, port } => {
            assert_eq!(family, Some(libc::AF_INET6));
            let mut ip = [0u8; 16];
            ip.copy_from_slice(&addr[8..24]);
            let ip = std::net::Ipv6Addr::from(ip);
            assert!(
                ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
                "non-loopback IPv6 routed: {ip}"
            );
            assert_eq!(*port, u16::from_be_bytes([addr[2], addr[3]]));
        }
    }
    for datagram in [false, true] {
        let object = dest.object(datagram);
        assert!(dest.candidate_objects().contains(&object));
        // A rule naming exactly this object matches it (when the name has no wildcards, which
        // would make the rule a pattern).
        if let Ok(pattern) = ObjectPattern::parse(Op::Connect, &object) {
            if !pattern.is_glob() {
                assert!(
                    pattern.matches(&object),
                    "{object:?} unmatched by its own rule"
                );
            }
        }
    }
    if let Some(target) = target {
        if let Ok(to) = dest.translated(target) {
            assert_eq!(
                matches!(to, Destination::Inet { .. }),
                matches!(dest, Destination::Inet { .. })
                    && !target.starts_with("unix:")
                    && !target.starts_with("abstract:"),
                "{dest:?} translated by {target:?} to {to:?}"
            );
        }
    }
});
