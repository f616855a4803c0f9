//! The command-line grammar (DESIGN.md section 4).

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "shuttle",
    version,
    about = "Split a system into isolated OS-level VMs that cooperate only as policy allows",
    long_about = "Shuttle runs each application of a system in its own lightweight OS-level VM: \
a copy-on-write view of the host root with its own mount, PID, IPC, UTS, network and cgroup \
namespaces, resource limits and a hardened seccomp profile.\n\n\
Quick start (as root):\n  \
shuttle vm create web --memory 512M\n  \
shuttle run web -- sh -c 'hostname; ps ax'\n  \
shuttle vm ls\n  \
shuttle vm stop web\n\n\
State lives in /var/lib/shuttle and /run/shuttle; set SHUTTLE_ROOT to keep both under one \
directory instead (tests do). Set SHUTTLE_LOG=debug for detailed logs on stderr."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create, list, start, stop and remove VMs
    #[command(subcommand)]
    Vm(VmCommand),
    /// Run a command inside a VM with this terminal's stdin, stdout and stderr
    ///
    /// The command's exit status becomes shuttle's (128+N when killed by signal N). The VM is
    /// started first if it is not running. Signals sent to shuttle (Ctrl-C, SIGTERM, ...) are
    /// forwarded to the command. Daemons the command starts keep running until the VM stops.
    /// Exit status 125 means shuttle itself failed, 126 that the command could not be
    /// executed, 127 that it was not found in the VM.
    ///
    /// Example: shuttle run web -e LANG=C.UTF-8 -w /srv -- python3 -m http.server
    Run(RunArgs),
    /// Check, load and explain the cross-VM policy
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Run the broker in the foreground (the CLI starts it in the background when needed)
    ///
    /// The broker owns the active policy and the audit store. VMs keep running and their
    /// monitors keep enforcing the last loaded policy while it is down; loading a policy
    /// needs it. SIGHUP reloads the file last loaded.
    Daemon {
        #[arg(long = "ready-fd", hide = true)]
        ready_fd: Option<i32>,
        /// Stop the running broker instead (SIGTERM; VMs keep running)
        #[arg(long)]
        stop: bool,
    },
    /// Show the audit trail: every cross-VM decision, allowed or denied
    ///
    /// Examples:
    ///   shuttle audit --denied --since 1h
    ///   shuttle audit --vm web --follow
    ///   shuttle audit --json | jq .
    Audit(AuditArgs),
    /// List requests that wait for an operator's answer (rules with action = "ask")
    Pending {
        /// Print a JSON array
        #[arg(long)]
        json: bool,
    },
    /// Answer a waiting request: allow or deny it
    ///
    /// Example: shuttle answer 3 allow --for 10m   (the same request is allowed for 10 minutes)
    Answer {
        /// The request's id, from `shuttle pending`
        id: u64,
        /// allow or deny
        #[arg(value_parser = ["allow", "deny"])]
        answer: String,
        /// Remember the answer for the same request for this long (90s, 15m, 2h, 7d)
        #[arg(long = "for", value_name = "DURATION")]
        remember: Option<String>,
    },
    /// Inside a VM: send a signal to a program running in another VM, as the policy allows
    ///
    /// The request goes to this VM's own broker socket (/run/shuttle/broker.sock), which is
    /// what identifies the VM. Example: shuttle signal db postgres --signal HUP
    Signal {
        /// The VM the program runs in
        vm: String,
        /// The program: a name (as ps shows it) or an absolute path
        program: String,
        /// The signal, by name (TERM, HUP, USR1, ...) or number
        #[arg(long, short = 's', default_value = "TERM")]
        signal: String,
    },
    /// Inside a VM: run a program of another VM, as the policy's invoke rules route it
    ///
    /// What the stub Shuttle puts at a routed program's path does: the program runs in the VM
    /// the rule names, as the caller's uid and gid (or the rule's user), with this process's
    /// stdin, stdout and stderr, the working directory (if that VM has it), and the variables
    /// the rule's env list allows; signals are forwarded and its exit status is this
    /// command's. Refused by the policy: a message and exit status 126.
    ///
    /// Example: shuttle invoke /usr/bin/sha256sum /etc/hostname
    Invoke {
        /// The program's absolute path, as the rule names it
        program: String,
        /// Its arguments
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "ARG"
        )]
        args: Vec<OsString>,
    },
    /// Bring a whole system up from a manifest: VMs, policy, applications in dependency order
    ///
    /// Creates the VMs that do not exist yet, loads the system's policy, starts the VMs,
    /// copies the manifest's files in, then starts every application once what it requires
    /// is ready (readiness probes), showing progress. A detached supervisor then keeps the
    /// applications running (restarts with backoff, as the manifest says) until `down`. If an
    /// application never becomes ready, everything this command started is stopped again.
    /// The manifest format is in the README ("Systems").
    ///
    /// Example: shuttle up examples/shop/system.toml
    Up {
        /// The system manifest (TOML)
        file: PathBuf,
    },
    /// Stop a system: its applications in reverse dependency order, then its VMs
    ///
    /// Example: shuttle down examples/shop/system.toml
    Down {
        /// The system manifest (TOML)
        file: PathBuf,
    },
    /// List the applications of running systems (state, restarts, uptime) and the VMs
    Ps {
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// Show an application's kept output (its stdout and stderr, and the supervisor's notes)
    ///
    /// Example: shuttle logs db.postgres --follow
    Logs {
        /// The application, as VM.APP
        app: String,
        /// Keep printing what it writes
        #[arg(long, short = 'f')]
        follow: bool,
    },
    /// Draw a system: VMs as boxes, applications inside, dependencies and allowed interactions
    ///
    /// Edges between VMs are the policy's rules that apply to the system's VMs, labelled with
    /// the audit's counts of allowed and denied requests; red dashed edges are requests that
    /// only were denied. While the system is up, applications are coloured by state.
    /// Example: shuttle graph examples/shop/system.toml --format svg > shop.svg
    Graph(GraphArgs),
    /// Inside a VM: open a file or URL with the handler of the VM the policy routes it to
    ///
    /// `open` rules route a URL by its scheme (object scheme:https) and a file by its MIME
    /// type (mime:application/pdf, from /etc/mime.types) or extension (ext:pdf); the rule's
    /// handler runs in the rule's VM with the URL, or the file shown read-only at
    /// /shuttle/from/THIS-VM/PATH. Installed as xdg-open (`ln -s /run/shuttle/shuttle
    /// /usr/local/bin/xdg-open` in the VM), `xdg-open URL` does the same. Refused: exit 126.
    ///
    /// Example: shuttle open https://example.org/   shuttle open ~/bill.pdf
    Open {
        /// A path or URL
        target: OsString,
    },
    /// Where a VM's file lives on the host, or which VMs' file a host path is
    ///
    /// VM:/PATH prints the host path: the VM's upper layer when the VM wrote the file, else
    /// its base (the host's root or the --base directory). A host path prints VM:/PATH and
    /// the layer (upper: that VM's own copy; base: seen through the VM's base, not copied),
    /// one line per VM. Paths are taken as named: symbolic links are not followed.
    ///
    /// Examples:
    ///   shuttle path web:/etc/nginx/nginx.conf
    ///   shuttle path /var/lib/shuttle/vms/web/upper/etc/hostname
    ///   shuttle path --json /etc/hosts
    Path {
        /// VM:/PATH, or a host path
        target: String,
        /// Print JSON (an object for VM:/PATH, an array for a host path)
        #[arg(long)]
        json: bool,
    },
    #[command(name = "__monitor", hide = true)]
    Monitor { name: String, ready_fd: i32 },
    #[command(name = "__supervise", hide = true)]
    Supervise { manifest: PathBuf, ready_fd: i32 },
    #[command(name = "__probe", hide = true)]
    Probe {
        #[arg(long)]
        socket: Option<String>,
        #[arg(long)]
        port: Option<u16>,
        #[arg(long)]
        exists: Option<String>,
    },
}

#[derive(Debug, Args)]
pub struct GraphArgs {
    /// The system manifest (TOML); without it, the one system that is up
    pub file: Option<PathBuf>,
    /// dot (Graphviz source) or svg (rendered with Graphviz's `dot`, which must be installed)
    #[arg(long, value_parser = ["dot", "svg"], default_value = "dot")]
    pub format: String,
    /// Print the graph's nodes and edges as JSON instead
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Create a VM (it does not start until `vm start` or `run`)
    ///
    /// Examples:
    ///   shuttle vm create db --memory 1G --pids 512
    ///   shuttle vm create build --base /srv/debian-bookworm --net host
    ///   shuttle vm create web --hide /home --hide /root --tag frontend
    Create(CreateArgs),
    /// List VMs and whether they run
    #[command(alias = "list")]
    Ls {
        /// Print a JSON array instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Start a VM's init and monitor
    Start { name: String },
    /// Stop a VM: SIGTERM to all its processes, SIGKILL after the grace period
    Stop {
        name: String,
        /// Seconds to wait after SIGTERM before SIGKILL
        #[arg(long, short = 't', default_value_t = 10)]
        timeout: u64,
    },
    /// Remove a stopped VM and every file it wrote
    #[command(alias = "remove")]
    Rm {
        name: String,
        /// Stop the VM first if it is running
        #[arg(long, short = 'f')]
        force: bool,
    },
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// VM name: 1-63 lower-case letters, digits and '-' (also its hostname)
    pub name: String,
    /// Lower layer of the VM's copy-on-write root: `host` (the host's /) or a directory tree
    #[arg(long, value_name = "host|DIR", default_value = "host")]
    pub base: String,
    /// Network: `none` (own namespace, loopback only) or `host` (the host's network)
    #[arg(long, value_name = "none|host", default_value = "none")]
    pub net: String,
    /// Memory limit, such as 512M or 2G (swap included); the OOM killer acts inside the VM
    #[arg(long, value_name = "SIZE")]
    pub memory: Option<String>,
    /// Maximum number of processes and threads in the VM
    #[arg(long, value_name = "N")]
    pub pids: Option<u64>,
    /// Make a host path invisible inside the VM (repeatable)
    #[arg(long, value_name = "PATH")]
    pub hide: Vec<PathBuf>,
    /// Tag the VM, for policy selectors such as @tag:frontend (repeatable)
    #[arg(long, value_name = "TAG")]
    pub tag: Vec<String>,
    /// Print the created VM's configuration as JSON
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The VM to run in (inside a VM: its own by default; another only where an `invoke`
    /// rule routes the program there)
    pub name: Option<String>,
    /// Set an environment variable (KEY=VALUE), or pass this shell's value (KEY); repeatable
    #[arg(long = "env", short = 'e', value_name = "KEY[=VALUE]")]
    pub env: Vec<String>,
    /// Working directory inside the VM (default /)
    #[arg(long = "workdir", short = 'w', value_name = "DIR")]
    pub workdir: Option<OsString>,
    /// Run as this user of the VM: NAME, UID or UID:GID (default root)
    #[arg(long, short = 'u', value_name = "USER")]
    pub user: Option<String>,
    /// Fail instead of starting the VM when it is not running
    #[arg(long)]
    pub no_start: bool,
    /// The command and its arguments (after --)
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<OsString>,
}

/// Where the policy lives unless a command names another file.
pub const DEFAULT_POLICY: &str = "/etc/shuttle/policy.toml";

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate a policy file: every error with FILE:LINE:COLUMN and how to fix it
    ///
    /// Unknown keys, unknown ops, malformed objects, bad selectors and rules that can never
    /// match (because an earlier rule already decides everything they would) are errors.
    /// Exit status 0 when the file is valid, 1 when it is not.
    ///
    /// Example: shuttle policy check examples/policy.toml
    Check {
        file: PathBuf,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
    /// Make FILE the active policy, atomically; a file with errors changes nothing
    ///
    /// Every running VM's monitor enforces it from the next request on. Needs the broker
    /// (started in the background if it is not running).
    Load { file: PathBuf },
    /// Show which rule decides a request, and why the rules before it do not
    ///
    /// Example:
    ///   shuttle policy explain --op connect --from web --to db \
    ///       --object unix:/run/postgresql/.s.PGSQL.5432
    Explain {
        /// connect, mq, share, ipc-group, signal, invoke or open
        #[arg(long)]
        op: String,
        /// The VM that asks (a VM name, or @host)
        #[arg(long)]
        from: String,
        /// The VM that serves the object; when absent, the policy routes the request
        #[arg(long)]
        to: Option<String>,
        /// The object, in the form the op takes (e.g. unix:/path, tcp:5432, /usr/bin/evince)
        #[arg(long)]
        object: String,
        /// For --op signal: the signal sent (TERM, HUP, ...)
        #[arg(long)]
        signal: Option<String>,
        /// The policy file to consult (default: the active policy, else /etc/shuttle/policy.toml)
        #[arg(long)]
        policy: Option<PathBuf>,
        /// Print the explanation as JSON
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Keep printing new records as they come
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// Only records where this VM asked or was asked
    #[arg(long, value_name = "NAME")]
    pub vm: Option<String>,
    /// Only refusals (denials, unanswered questions and errors)
    #[arg(long)]
    pub denied: bool,
    /// Only records younger than this, such as 90s, 15m, 2h or 7d
    #[arg(long, value_name = "DURATION")]
    pub since: Option<String>,
    /// One JSON object per line
    #[arg(long)]
    pub json: bool,
}
