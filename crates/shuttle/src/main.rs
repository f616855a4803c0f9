//! `shuttle`: the command-line interface. A thin layer over the library crates: it parses
//! arguments, checks the preconditions users can fix, and renders results for people (or
//! as JSON for scripts). The same binary runs the per-VM monitor role (a hidden subcommand),
//! so a VM's supervisor is always the exact code the user invoked.
#![forbid(unsafe_code)]

mod broker_cmd;
mod cli;
mod commands;
mod graph_cmd;
mod invoke_cmd;
mod policy_cmd;
mod report;
mod supervise;
mod system_cmd;
mod terminal_io;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // Under a program path in a VM, this binary is that program's invoke stub.
    let code = match invoke_cmd::stub_program() {
        Some(program) => invoke_cmd::stub_main(program),
        // Installed as the VM's xdg-open: `xdg-open PATH|URL` is `shuttle open PATH|URL`.
        None if invoke_cmd::called_as_xdg_open() => invoke_cmd::xdg_open_main(),
        None => commands::dispatch(cli::Cli::parse()),
    };
    ExitCode::from(u8::try_from(code.clamp(0, 255)).unwrap_or(1))
}
