//! Every message type of the wire protocol, decoded from arbitrary bytes: decoding never
//! panics, and whatever decodes encodes again and decodes to the same encoding (nothing a peer
//! sends is accepted in a form this side could not send back as it understood it).

#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use serde::Serialize;
use shuttle_proto::{
    BrokerReply, BrokerRequest, CommandSpec, Hello, InitEvent, InitRequest, InvokeSpec,
    MonitorReply, MonitorRequest, VmReply, VmRequest, VmStatus,
};

fn round_trip<T: Serialize + DeserializeOwned>(data: &[u8]) {
    let Ok(msg) = serde_json::from_slice::<T>(data) else {
        return;
    };
    let once = serde_json::to_vec(&msg).expect("a decoded message encodes");
    let again: T = serde_json::from_slice(&once).unwrap_or_else(|e| {
        panic!(
            "{}: its own encoding does not decode ({e}): {}",
            std::any::type_name::<T>(),
            String::from_utf8_lossy(&once)
        )
    });
    let twice = serde_json::to_vec(&again).expect("a decoded message encodes");
    assert_eq!(
        once,
        twice,
        "{}: encoding is not stable",
        std::any::type_name::<T>()
    );
}

fuzz_target!(|data: &[u8]| {
    // What a process in a VM may send to its broker socket, first: it is the hostile side.
    round_trip::<VmRequest>(data);
    round_trip::<InvokeSpec>(data);
    round_trip::<Hello>(data);
    round_trip::<MonitorRequest>(data);
    round_trip::<CommandSpec>(data);
    round_trip::<BrokerRequest>(data);
    round_trip::<InitRequest>(data);
    round_trip::<InitEvent>(data);
    round_trip::<VmReply>(data);
    round_trip::<MonitorReply>(data);
    round_trip::<BrokerReply>(data);
    round_trip::<VmStatus>(data);
});
