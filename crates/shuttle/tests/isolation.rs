//! What a VM sees of the host and of other VMs: copy-on-write files, processes, hostname,
//! network, IPC, hidden paths.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::ErrorKind;
use std::net::TcpListener;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixStream};

use common::{assert_code, assert_success, host_dir, stdout, Env};

#[test]
fn writes_are_copy_on_write_and_persist_across_restarts() {
    let Some(env) = Env::new() else { return };
    let host = host_dir();
    let victim = host.path().join("victim");
    std::fs::write(&victim, "host data\n").unwrap();
    let victim = victim.to_str().unwrap().to_owned();
    let marker = format!("/etc/shuttle-cow-test-{}", std::process::id());
    env.create("cow", &[]);

    env.run_ok(
        "cow",
        &format!(
            "echo inside > {marker} && mkdir -p /root/cowdir && echo x > /root/cowdir/x \
             && cat {victim} && rm {victim} && test ! -e {victim}"
        ),
    );
    assert!(
        !std::path::Path::new(&marker).exists(),
        "{marker} written inside the VM appeared on the host"
    );
    assert_eq!(
        std::fs::read_to_string(&victim).expect("the host file deleted inside the VM must stay"),
        "host data\n"
    );
    let upper_file = env.upper("cow").join(marker.trim_start_matches('/'));
    assert_eq!(
        std::fs::read_to_string(&upper_file)
            .unwrap_or_else(|e| panic!("{} should hold the VM's write: {e}", upper_file.display())),
        "inside\n"
    );
    assert!(env.upper("cow").join("root/cowdir/x").is_file());

    let check = format!("cat {marker} /root/cowdir/x; test ! -e {victim} && echo victim-gone");
    assert_eq!(env.run_ok("cow", &check), "inside\nx\nvictim-gone\n");

    env.ok(&["vm", "stop", "cow"]);
    assert_eq!(env.state("cow"), "stopped");
    env.ok(&["vm", "start", "cow"]);
    assert_eq!(
        env.run_ok("cow", &check),
        "inside\nx\nvictim-gone\n",
        "the VM's files must persist across stop and start"
    );
    assert!(std::path::Path::new(&victim).exists());
}

#[test]
fn processes_are_isolated_and_init_is_pid_1() {
    let Some(env) = Env::new() else { return };
    env.create("pids", &[]);
    env.ok(&["vm", "start", "pids"]);
    let init = env.init_pid("pids");

    let out = env.py_ok(
        "pids",
        "import os\n\
         print(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))\n\
         print(open('/proc/1/cmdline','rb').read().hex())\n\
         print(os.getpid())",
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    let pids: Vec<i32> = lines[0]
        .trim_matches(|c| c == '[' || c == ']')
        .split(", ")
        .map(|p| p.parse().unwrap())
        .collect();
    assert!(pids.contains(&1), "no PID 1 in the VM's /proc: {pids:?}");
    // init, the python process, and at most a helper or two: nothing of the host.
    assert!(pids.len() <= 4, "the VM sees too many processes: {pids:?}");
    let own = i32::try_from(std::process::id()).unwrap();
    if own > 4 {
        assert!(!pids.contains(&own), "the test's own pid {own} is visible");
    }
    let host_cmdline = std::fs::read(format!("/proc/{init}/cmdline")).unwrap();
    let hex: String = host_cmdline.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(
        lines[1], hex,
        "PID 1 inside the VM is not the VM's init (host pid {init})"
    );
    let status = std::fs::read_to_string(format!("/proc/{init}/status")).unwrap();
    let nspid = status
        .lines()
        .find(|l| l.starts_with("NSpid:"))
        .expect("NSpid line");
    assert!(
        nspid.ends_with("\t1"),
        "the VM's init is not PID 1 of its namespace: {nspid}"
    );

    let ps = env.run_ok("pids", "ps -e -o pid= -o comm=");
    assert!(
        ps.lines().count() <= 4,
        "ps inside shows host processes:\n{ps}"
    );
    assert!(!ps.contains("cargo") && !ps.contains("nextest"), "{ps}");
}

#[test]
fn hostname_is_the_vm_name() {
    let Some(env) = Env::new() else { return };
    let before = nix::unistd::gethostname().unwrap();
    env.create("uts-vm", &[]);
    assert_eq!(
        env.run_ok("uts-vm", "hostname; uname -n"),
        "uts-vm\nuts-vm\n"
    );
    assert_eq!(nix::unistd::gethostname().unwrap(), before);
}

#[test]
fn net_none_has_only_loopback_and_cannot_reach_the_host() {
    let Some(env) = Env::new() else { return };
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    env.create("netnone", &[]);

    let ifaces = env.run_ok(
        "netnone",
        "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '",
    );
    assert_eq!(ifaces, "lo\n", "net none should have only lo");

    let out = env.py_ok(
        "netnone",
        &format!(
            "import socket\n\
             s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n\
             c = socket.create_connection(s.getsockname(), timeout=2)\n\
             a, _ = s.accept(); a.sendall(b'ok'); print('loopback', c.recv(2).decode())\n\
             try:\n    socket.create_connection(('127.0.0.1', {port}), timeout=2); print('host-reached')\n\
             except ConnectionRefusedError:\n    print('refused')\n"
        ),
    );
    assert_eq!(out, "loopback ok\nrefused\n");
    assert!(
        listener.accept().is_err(),
        "the host listener got a connection from a net-none VM"
    );
}

#[test]
fn net_host_reaches_host_loopback() {
    let Some(env) = Env::new() else { return };
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    env.create("nethost", &["--net", "host"]);
    let out = env.py_ok(
        "nethost",
        &format!(
            "import socket\n\
             c = socket.create_connection(('127.0.0.1', {port}), timeout=5)\n\
             print('connected'); c.sendall(b'from-vm'); c.close()"
        ),
    );
    assert_eq!(out, "connected\n");
    let (mut conn, _) = listener.accept().unwrap();
    let mut got = String::new();
    std::io::Read::read_to_string(&mut conn, &mut got).unwrap();
    assert_eq!(got, "from-vm");
}

/// Lines of /proc/sysvipc/FILE after the header.
fn sysv_keys(text: &str) -> Vec<String> {
    text.lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

#[test]
fn sysv_ipc_is_per_vm() {
    let Some(env) = Env::new() else { return };
    env.create("ipca", &[]);
    env.create("ipcb", &[]);
    env.run_ok("ipca", "ipcmk -Q >/dev/null && ipcmk -M 4096 >/dev/null");
    let msg_a = sysv_keys(&env.run_ok("ipca", "cat /proc/sysvipc/msg"));
    let shm_a = sysv_keys(&env.run_ok("ipca", "cat /proc/sysvipc/shm"));
    assert_eq!(msg_a.len(), 1, "VM a should see its own queue: {msg_a:?}");
    assert_eq!(shm_a.len(), 1, "VM a should see its own segment: {shm_a:?}");

    assert_eq!(
        env.run_ok(
            "ipcb",
            "tail -n +2 /proc/sysvipc/msg; tail -n +2 /proc/sysvipc/shm"
        ),
        "",
        "VM b sees SysV objects"
    );
    let ipcs_b = env.run_ok("ipcb", "ipcs -q -m");
    assert!(!ipcs_b.lines().any(|l| l.starts_with("0x")), "{ipcs_b}");

    let host_msg = sysv_keys(&std::fs::read_to_string("/proc/sysvipc/msg").unwrap());
    let host_shm = sysv_keys(&std::fs::read_to_string("/proc/sysvipc/shm").unwrap());
    assert!(!host_msg.contains(&msg_a[0]), "the host sees VM a's queue");
    assert!(
        !host_shm.contains(&shm_a[0]),
        "the host sees VM a's segment"
    );
}

#[test]
fn posix_message_queues_are_per_vm() {
    let Some(env) = Env::new() else { return };
    let q = format!("shuttle-test-{}", std::process::id());
    env.create("mqa", &[]);
    env.create("mqb", &[]);
    env.run_ok("mqa", &format!("touch /dev/mqueue/{q}"));
    assert_eq!(env.run_ok("mqa", "ls /dev/mqueue"), format!("{q}\n"));
    assert_eq!(
        env.run_ok("mqb", "ls -A /dev/mqueue"),
        "",
        "VM b sees VM a's queue"
    );
    // The host's own queues, seen through a fresh mqueue mount in a private mount namespace.
    let host = std::process::Command::new("unshare")
        .args([
            "-m",
            "sh",
            "-c",
            "d=$(mktemp -d) && mount -t mqueue mq $d && ls -A $d; umount $d; rmdir $d",
        ])
        .output()
        .unwrap();
    assert_success(&host, "listing the host's message queues");
    assert!(
        !stdout(&host).lines().any(|l| l == q),
        "the host sees VM a's queue"
    );
}

#[test]
fn abstract_unix_sockets_are_per_vm() {
    let Some(env) = Env::new() else { return };
    let name = format!("shuttle-test-abs-{}", std::process::id());
    env.create("absa", &[]);
    env.create("absb", &[]);
    let server = format!(
        "import socket, time\n\
         s = socket.socket(socket.AF_UNIX); s.bind('\\0{name}'); s.listen()\n\
         while True:\n    c, _ = s.accept(); c.sendall(b'hello'); c.close()\n"
    );
    let out = env.exec(
        "absa",
        &[
            "sh",
            "-c",
            "python3 -c \"$1\" </dev/null >/dev/null 2>&1 &",
            "sh",
            &server,
        ],
    );
    assert_success(&out, "starting the abstract socket server");
    let client = format!(
        "import socket, time, sys\n\
         for i in range(100):\n\
         \x20   try:\n\
         \x20       c = socket.socket(socket.AF_UNIX); c.connect('\\0{name}'); print(c.recv(5).decode()); break\n\
         \x20   except ConnectionRefusedError:\n\
         \x20       if sys.argv[1] == 'once': print('refused'); break\n\
         \x20       time.sleep(0.05)\n"
    );
    let intra = env.exec("absa", &["python3", "-c", &client, "retry"]);
    assert_success(&intra, "intra-VM connect");
    assert_eq!(
        stdout(&intra),
        "hello\n",
        "a process in the same VM must connect"
    );

    let other = env.exec("absb", &["python3", "-c", &client, "once"]);
    assert_success(&other, "connect from VM b");
    assert_eq!(stdout(&other), "refused\n", "VM b reached VM a's socket");

    let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let err = UnixStream::connect_addr(&addr).expect_err("the host reached VM a's socket");
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
}

#[test]
fn vms_see_neither_files_nor_processes_of_each_other() {
    let Some(env) = Env::new() else { return };
    env.create("va", &[]);
    env.create("vb", &[]);
    env.run_ok(
        "va",
        "echo secret > /srv/only-a && sleep 313 </dev/null >/dev/null 2>&1 &",
    );
    let ps_a = env.run_ok("va", "ps -e -o args=");
    assert!(ps_a.contains("sleep 313"), "VM a lost its daemon:\n{ps_a}");

    let upper_a = env.upper("va");
    let out = env.run(
        "vb",
        &format!(
            "test -e /srv/only-a && echo sees-''file; test -e {} && echo sees-''upper; \
             ls -A {} 2>/dev/null; true",
            upper_a.display(),
            env.path().display()
        ),
    );
    assert_code(&out, 0, "looking around in VM b");
    let s = stdout(&out);
    assert!(!s.contains("sees-file"), "VM b sees VM a's file:\n{s}");
    assert!(
        !s.contains("sees-upper"),
        "VM b sees VM a's upper dir:\n{s}"
    );
    assert!(!s.contains("state"), "VM b sees the state directory:\n{s}");
    let ps_b = env.run_ok("vb", "ps -e -o args=");
    assert!(
        !ps_b.contains("sleep 313"),
        "VM b sees VM a's process:\n{ps_b}"
    );
}

#[test]
fn hidden_paths_and_shuttle_root_are_empty_inside() {
    // SHUTTLE_ROOT outside /tmp, so that the VM's own /tmp does not hide it by accident. Its
    // state and run directories may show up as (empty) mount points, but nothing below them.
    let Some(env) = Env::new_in("/var/tmp") else {
        return;
    };
    let secret_dir = host_dir();
    std::fs::write(secret_dir.path().join("secret"), "s3cret").unwrap();
    std::fs::create_dir(secret_dir.path().join("sub")).unwrap();
    let open_dir = host_dir();
    std::fs::write(open_dir.path().join("visible"), "v").unwrap();
    let secret = secret_dir.path().to_str().unwrap();
    env.create("hide", &["--hide", secret]);
    let root = env.path().display().to_string();
    let out = env.run(
        "hide",
        &format!(
            "echo hidden:; ls -A {secret}; cat {secret}/secret 2>/dev/null; \
             echo root:; find {root} -mindepth 2 2>/dev/null; \
             echo open:; ls -A {}",
            open_dir.path().display()
        ),
    );
    assert_code(&out, 0, "looking at hidden paths");
    let s = stdout(&out);
    assert_eq!(
        s, "hidden:\nroot:\nopen:\nvisible\n",
        "--hide {secret} and SHUTTLE_ROOT {root} must be empty inside"
    );
    assert!(!s.contains("s3cret"));
}

#[test]
fn callers_environment_does_not_leak_into_the_vm() {
    let Some(env) = Env::new() else { return };
    env.create("envleak", &[]);
    // Whoever starts the VM may have secrets in its environment; only what `run` passes on
    // purpose (-e, TERM, LANG, ...) may reach the VM, and nothing through its init.
    let secret = "shuttle-test-secret-value";
    let out = env
        .cmd(&["vm", "start", "envleak"])
        .env("SHUTTLE_TEST_SECRET", secret)
        .output()
        .expect("spawning shuttle vm start");
    assert_success(&out, "vm start");
    let out = env
        .cmd(&[
            "run",
            "envleak",
            "--",
            "sh",
            "-c",
            "cat /proc/[0-9]*/environ | tr '\\0' '\\n'",
        ])
        .env("SHUTTLE_TEST_SECRET", secret)
        .output()
        .expect("spawning shuttle run");
    assert_success(&out, "reading environments inside the VM");
    let leaked = stdout(&out).lines().filter(|l| l.contains(secret)).count();
    assert_eq!(
        leaked, 0,
        "SHUTTLE_TEST_SECRET of the process that started the VM is readable inside it \
         (in /proc/1/environ, the VM's init)"
    );
}
