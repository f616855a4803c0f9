//! POSIX message queues across VMs through mediated `mq_open`.
#![allow(clippy::unwrap_used)]

mod common;

use common::{assert_success, stdout, Env};

/// Opens /jobs in the VM it runs in (creating it, sending to it or receiving from it) with
/// the C library's mq_open, and prints what happened.
const MQ: &str = r#"
import ctypes, os, sys
rt = ctypes.CDLL("librt.so.1", use_errno=True)
rt.mq_open.restype = ctypes.c_int
rt.mq_open.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]
rt.mq_send.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint]
rt.mq_receive.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_void_p]
rt.mq_receive.restype = ctypes.c_ssize_t
op = sys.argv[1]
q = rt.mq_open(b"/jobs", os.O_RDWR | (os.O_CREAT if op == "create" else 0), 0o666, None)
if q < 0:
    print("errno", ctypes.get_errno())
elif op == "send":
    print("sent", rt.mq_send(q, b"hello", 5, 0))
elif op == "recv":
    buf = ctypes.create_string_buffer(8192)
    n = rt.mq_receive(q, buf, 8192, None)
    print("got", buf.raw[:n].decode())
else:
    print("created")
"#;

fn mq(env: &Env, vm: &str, op: &str) -> String {
    stdout(&env.exec(vm, &["python3", "-c", MQ, op]))
        .trim()
        .to_owned()
}

#[test]
fn a_queue_of_another_vm_is_reachable_only_by_rule() {
    let Some(env) = Env::new() else { return };
    for vm in ["srv", "cli", "other"] {
        env.create(vm, &[]);
    }
    let file = env.path().join("policy.toml");
    std::fs::write(&file, "[[rule]]\nop = \"mq\"\nfrom = \"cli\"\nto = \"srv\"\nobject = \"mq:/jobs\"\naction = \"allow\"\n").unwrap();
    assert_success(
        &env.output(&["policy", "load", file.to_str().unwrap()]),
        "policy load",
    );
    assert_eq!(mq(&env, "srv", "create"), "created");
    assert_eq!(mq(&env, "cli", "send"), "sent 0");
    assert_eq!(mq(&env, "srv", "recv"), "got hello");
    // No rule: other's own IPC namespace, where no such queue exists; audited.
    assert_eq!(mq(&env, "other", "send"), "errno 2");
    let audit = stdout(&env.output(&["audit", "--json", "--vm", "other"]));
    let record: serde_json::Value = serde_json::from_str(audit.lines().next().unwrap()).unwrap();
    assert_eq!(
        (record["op"].as_str(), record["result"].as_str()),
        (Some("mq"), Some("deny"))
    );
}
