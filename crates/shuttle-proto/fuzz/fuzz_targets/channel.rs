//! One packet of arbitrary bytes, as a process in a VM can send it to its broker socket,
//! received through the real `Channel` (SOCK_SEQPACKET, the size limit, empty packets):
//! receiving never panics and gives a request or an error, never anything else; the channel
//! stays usable for the next packet.

#![no_main]

use std::os::fd::AsFd;

use libfuzzer_sys::fuzz_target;
use nix::sys::socket::{send, MsgFlags};
use shuttle_proto::{Channel, ChannelError, VmRequest, MAX_MESSAGE_BYTES};

fuzz_target!(|data: &[u8]| {
    if data.len() > MAX_MESSAGE_BYTES {
        return;
    }
    let (vm_side, monitor_side) = Channel::pair().expect("socketpair");
    send(
        std::os::fd::AsRawFd::as_raw_fd(&vm_side.as_fd()),
        data,
        MsgFlags::empty(),
    )
    .expect("send");
    match monitor_side.recv::<VmRequest>() {
        Ok(_) => {}
        Err(ChannelError::Decode(_) | ChannelError::Unexpected(_)) => {}
        Err(e) => panic!("unexpected error for a {}-byte packet: {e}", data.len()),
    }
    // The conversation goes on: a well-formed request after a bad one is understood.
    vm_side
        .send(&VmRequest::Hello(shuttle_proto::Hello { version: 1 }))
        .expect("send hello");
    assert!(matches!(
        monitor_side.recv::<VmRequest>(),
        Ok(VmRequest::Hello(_))
    ));
});
