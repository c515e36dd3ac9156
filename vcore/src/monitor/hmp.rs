//! QEMU's human monitor commands.

use super::{threads, MonitorCtx};
use crate::units::size_with_bytes;
use crate::vm::{RunState, VmExit};

/// What a command printed, and whether the monitor should close.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reply {
    pub output: String,
    pub quit: bool,
}

fn out(s: impl Into<String>) -> Reply {
    Reply {
        output: s.into(),
        quit: false,
    }
}

const HELP: &str = "\
cont|c -- resume emulation
help|? [cmd] -- show the help
info [subcommand] -- show various information about the system state
q|quit -- quit the emulator
stop -- stop emulation
system_reset -- reset the system
";

const INFO_HELP: &str = "\
info cpus  -- show infos for each CPU
info kvm  -- show KVM information
info memory  -- show guest memory size, backing and page size
info name  -- show the current VM name
info status  -- show the current VM status (running|paused)
info threads  -- show every thread of the VMM with its role
info version  -- show the version of QEMU
";

/// Execute one HMP command line.
pub fn execute(ctx: &MonitorCtx, line: &str) -> Reply {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        [] => out(""),
        ["help" | "?", ..] => out(HELP),
        ["info"] => out(INFO_HELP),
        ["info", what, ..] => info(ctx, what),
        ["stop"] => {
            ctx.control.pause();
            out("")
        }
        ["cont" | "c"] => {
            ctx.control.resume();
            out("")
        }
        ["system_reset"] => {
            ctx.control.request_exit(VmExit::Reset);
            out("")
        }
        ["quit" | "q"] => {
            ctx.control.request_exit(VmExit::Quit);
            Reply {
                output: String::new(),
                quit: true,
            }
        }
        [cmd, ..] => out(format!("unknown command: '{cmd}'\n")),
    }
}

fn info(ctx: &MonitorCtx, what: &str) -> Reply {
    match what {
        "kvm" => out("kvm support: enabled\n"),
        "status" => out(match ctx.control.state() {
            RunState::Running => "VM status: running\n",
            RunState::Paused => "VM status: paused\n",
        }),
        "version" => out(format!("{} (vmrun)\n", ctx.version)),
        "name" => out(ctx
            .name
            .as_deref()
            .map(|n| format!("{n}\n"))
            .unwrap_or_default()),
        "cpus" => {
            let mut s = String::new();
            for (i, tid) in ctx.control.vcpu_tids().iter().enumerate() {
                let mark = if i == 0 { '*' } else { ' ' };
                s += &format!("{mark} CPU #{i}: thread_id={tid}\n");
            }
            out(s)
        }
        "memory" => {
            let m = &ctx.mem;
            out(format!(
                "memory: {}\nbacking: {}\npage size: {}\nprealloc: {}\n",
                size_with_bytes(m.size),
                m.backing,
                size_with_bytes(m.page_size),
                if m.prealloc { "on" } else { "off" }
            ))
        }
        "threads" => {
            let mut s = format!("{:<8} {:<10} {}\n", "TID", "ROLE", "NAME");
            for t in threads() {
                s += &format!("{:<8} {:<10} {}\n", t.tid, t.role, t.name);
            }
            out(s)
        }
        other => out(format!("unknown command: 'info {other}'\n")),
    }
}
