//! QMP: QEMU's JSON monitor protocol (greeting, capabilities negotiation,
//! `{"execute": ...}` → `{"return": ...}` / `{"error": ...}`).

use std::io::{BufReader, Write};

use serde_json::{json, Value};

use super::{hmp, MonitorCtx};
use crate::vm::{RunState, VmExit};

fn version_json(v: &str) -> Value {
    let mut it = v.split('.').map(|x| x.parse::<u64>().unwrap_or(0));
    json!({
        "qemu": {"major": it.next().unwrap_or(0), "minor": it.next().unwrap_or(0), "micro": it.next().unwrap_or(0)},
        "package": "vmrun"
    })
}

/// The greeting sent when a client connects.
pub fn greeting(ctx: &MonitorCtx) -> Value {
    json!({"QMP": {"version": version_json(&ctx.version), "capabilities": []}})
}

fn error(class: &str, desc: impl Into<String>) -> Value {
    json!({"error": {"class": class, "desc": desc.into()}})
}

/// Handle one message. `negotiated` tracks `qmp_capabilities`. Returns the
/// reply and whether the connection should close.
pub fn handle(ctx: &MonitorCtx, msg: &str, negotiated: &mut bool) -> (Value, bool) {
    match serde_json::from_str(msg) {
        Ok(v) => handle_value(ctx, v, negotiated),
        Err(e) => (
            error("GenericError", format!("JSON parse error, {e}")),
            false,
        ),
    }
}

/// Handle one parsed message.
pub fn handle_value(ctx: &MonitorCtx, v: Value, negotiated: &mut bool) -> (Value, bool) {
    let Some(cmd) = v.get("execute").and_then(Value::as_str) else {
        return (
            error(
                "GenericError",
                "QMP input must be a JSON object with an 'execute' member",
            ),
            false,
        );
    };
    let id = v.get("id").cloned();
    let args = v.get("arguments").cloned().unwrap_or(json!({}));
    let mut quit = false;
    let mut reply = if cmd == "qmp_capabilities" {
        *negotiated = true;
        json!({"return": {}})
    } else if !*negotiated {
        error(
            "CommandNotFound",
            "Expecting capabilities negotiation with 'qmp_capabilities'",
        )
    } else {
        match cmd {
            "query-status" => {
                let st = ctx.control().state();
                json!({"return": {"status": st.as_str(), "singlestep": false, "running": st == RunState::Running}})
            }
            "query-kvm" => json!({"return": {"enabled": true, "present": true}}),
            "query-version" => json!({"return": version_json(&ctx.version)}),
            "query-name" => match &ctx.name {
                Some(n) => json!({"return": {"name": n}}),
                None => json!({"return": {}}),
            },
            "query-cpus-fast" => {
                let t = ctx.topology;
                let cpus: Vec<Value> = ctx
                    .control()
                    .vcpu_tids()
                    .iter()
                    .enumerate()
                    .map(|(i, tid)| {
                        let i = i as u32;
                        json!({
                            "thread-id": tid,
                            "props": {
                                "core-id": (i / t.threads) % t.cores,
                                "thread-id": i % t.threads,
                                "node-id": 0,
                                "socket-id": i / (t.threads * t.cores)
                            },
                            "qom-path": format!("/machine/unattached/device[{i}]"),
                            "cpu-index": i,
                            "target": "x86_64"
                        })
                    })
                    .collect();
                json!({"return": cpus})
            }
            "stop" => {
                ctx.control().pause();
                json!({"return": {}})
            }
            "cont" => {
                ctx.control().resume();
                json!({"return": {}})
            }
            "system_reset" => {
                ctx.control().request_exit(VmExit::Reset);
                json!({"return": {}})
            }
            "quit" => {
                ctx.control().request_exit(VmExit::Quit);
                quit = true;
                json!({"return": {}})
            }
            "human-monitor-command" => match args.get("command-line").and_then(Value::as_str) {
                Some(line) => {
                    let r = hmp::execute(ctx, line);
                    quit = r.quit;
                    json!({"return": r.output})
                }
                None => error("GenericError", "Parameter 'command-line' is missing"),
            },
            other => error(
                "CommandNotFound",
                format!("The command {other} has not been found"),
            ),
        }
    };
    if let (Some(id), Some(obj)) = (id, reply.as_object_mut()) {
        obj.insert("id".into(), id);
    }
    (reply, quit)
}

/// Serve one QMP client; returns true when it asked the VM to quit.
pub fn serve<S: std::io::Read + Write + TryCloneStream>(conn: S, ctx: &MonitorCtx) -> bool {
    let Ok(mut out) = conn.try_clone_stream() else {
        return false;
    };
    if send(&mut out, &greeting(ctx)).is_err() {
        return false;
    }
    let mut negotiated = false;
    // Like QEMU's streaming parser: objects may share a line or span lines.
    let stream = serde_json::Deserializer::from_reader(BufReader::new(conn)).into_iter::<Value>();
    for msg in stream {
        let (reply, quit) = match msg {
            Ok(v) => handle_value(ctx, v, &mut negotiated),
            Err(e) if e.is_io() || e.is_eof() => return false,
            Err(e) => {
                let _ = send(
                    &mut out,
                    &error("GenericError", format!("JSON parse error, {e}")),
                );
                return false;
            }
        };
        if send(&mut out, &reply).is_err() {
            return false;
        }
        if quit {
            return true;
        }
    }
    false
}

/// Write one message and its newline in a single write: formatting a
/// `Value` straight into an unbuffered socket sends every token on its own.
fn send(out: &mut impl Write, msg: &Value) -> std::io::Result<()> {
    out.write_all(format!("{msg}\n").as_bytes())
}

/// Streams that can be split into a reader and a writer.
pub trait TryCloneStream: Sized {
    fn try_clone_stream(&self) -> std::io::Result<Self>;
}

impl TryCloneStream for std::os::unix::net::UnixStream {
    fn try_clone_stream(&self) -> std::io::Result<Self> {
        self.try_clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpuid::Topology;
    use crate::monitor::MemInfo;
    use crate::vm::VmControl;
    use std::sync::Arc;

    fn ctx() -> (MonitorCtx, std::sync::mpsc::Receiver<VmExit>) {
        let (tx, rx) = std::sync::mpsc::channel();
        let control = Arc::new(VmControl::new_for_test(2, tx));
        let ctx = MonitorCtx {
            control: std::sync::Mutex::new(control),
            name: Some("t".into()),
            topology: Topology {
                sockets: 1,
                cores: 2,
                threads: 1,
            },
            mem: MemInfo {
                size: 256 << 20,
                backing: "anonymous".into(),
                page_size: 4096,
                prealloc: false,
            },
            version: "0.1.0".into(),
        };
        (ctx, rx)
    }

    #[test]
    fn negotiation_commands_and_errors() {
        let (ctx, rx) = ctx();
        let mut neg = false;
        let (r, _) = handle(&ctx, r#"{"execute":"query-status"}"#, &mut neg);
        assert_eq!(r["error"]["class"], "CommandNotFound");
        let (r, _) = handle(&ctx, r#"{"execute":"qmp_capabilities","id":7}"#, &mut neg);
        assert_eq!(r, json!({"return": {}, "id": 7}));
        let (r, _) = handle(&ctx, r#"{"execute":"query-status"}"#, &mut neg);
        assert_eq!(r["return"]["status"], "running");
        let (r, _) = handle(&ctx, r#"{"execute":"query-cpus-fast"}"#, &mut neg);
        assert_eq!(r["return"].as_array().unwrap().len(), 2);
        assert_eq!(r["return"][1]["props"]["core-id"], 1);
        let (r, _) = handle(&ctx, r#"{"execute":"bogus"}"#, &mut neg);
        assert_eq!(r["error"]["desc"], "The command bogus has not been found");
        let (r, _) = handle(&ctx, "not json", &mut neg);
        assert_eq!(r["error"]["class"], "GenericError");
        let (r, _) = handle(
            &ctx,
            r#"{"execute":"human-monitor-command","arguments":{"command-line":"info kvm"}}"#,
            &mut neg,
        );
        assert_eq!(r["return"], "kvm support: enabled\n");
        let (r, quit) = handle(&ctx, r#"{"execute":"quit"}"#, &mut neg);
        assert_eq!(r, json!({"return": {}}));
        assert!(quit);
        assert_eq!(rx.try_recv(), Ok(VmExit::Quit));
    }

    #[test]
    fn hmp_commands() {
        let (ctx, rx) = ctx();
        assert_eq!(
            hmp::execute(&ctx, "info kvm").output,
            "kvm support: enabled\n"
        );
        assert_eq!(
            hmp::execute(&ctx, "info status").output,
            "VM status: running\n"
        );
        assert_eq!(
            hmp::execute(&ctx, "info cpus").output,
            "* CPU #0: thread_id=0\n  CPU #1: thread_id=0\n"
        );
        assert_eq!(
            hmp::execute(&ctx, "frobnicate").output,
            "unknown command: 'frobnicate'\n"
        );
        assert!(hmp::execute(&ctx, "info memory")
            .output
            .contains("memory: 256 MiB (268435456 bytes)"));
        assert!(hmp::execute(&ctx, "help").output.contains("system_reset"));
        hmp::execute(&ctx, "stop");
        assert_eq!(
            hmp::execute(&ctx, "info status").output,
            "VM status: paused\n"
        );
        hmp::execute(&ctx, "c");
        assert_eq!(
            hmp::execute(&ctx, "info status").output,
            "VM status: running\n"
        );
        hmp::execute(&ctx, "system_reset");
        assert_eq!(rx.try_recv(), Ok(VmExit::Reset));
        assert!(hmp::execute(&ctx, "q").quit);
    }
}
