//! End-to-end checks of the engine without any front end: the prelude is loaded, markers become
//! events, panics and `?` errors become errors, the interrupt flag is one flag for all cells.
//!
//! Uses a build slot under PIVOT_CACHE_DIR (default ~/.cache/pivot-lab) like the kernel does:
//! fast when slot 0 is warm (`pivot-kernel warm`), minutes otherwise.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use pivot_engine::{self as engine, paths, slots, Event, Frontend, InterruptOutcome, Session, SessionOptions, StreamName};

fn stream_of(events: &[Event], want: StreamName) -> String {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Stream { name, text } if *name == want => Some(text.as_str()),
            _ => None,
        })
        .collect()
}

fn stdout_of(events: &[Event]) -> String {
    stream_of(events, StreamName::Stdout)
}

#[test]
fn engine_end_to_end() {
    // One test function: the environment is set before evcxr starts any thread of its own.
    let slot = slots::acquire(&paths::cache_dir(), None).expect("a build slot");
    // The kernel's executable (not this test's) runs the cell-build shim, as it runs the child.
    engine::prepare_process_env_for(&slot.dir, std::path::Path::new(env!("CARGO_BIN_EXE_pivot-kernel")));
    slot.seed_if_cold();
    let events: Arc<Mutex<Vec<Event>>> = Arc::default();
    let ev = events.clone();
    let sink: engine::Sink = Arc::new(move |e| ev.lock().unwrap().push(e));
    let mut opts = SessionOptions::new(Frontend::Repl).unwrap();
    opts.child_exe = env!("CARGO_BIN_EXE_pivot-kernel").into();
    opts.interrupt_grace = Duration::from_secs(2);
    opts.interrupt_warn = Duration::from_millis(500);
    let mut s = Session::start(opts, sink).expect("session starts");
    slot.mark_warm();
    let take = || std::mem::take(&mut *events.lock().unwrap());
    let no_input = |_: &str, _: bool| String::new();
    take();

    // Output and final values.
    let r = s.execute("println!(\"hi\");\n1 + 1", &no_input);
    assert!(r.error.is_none(), "{:?}", r.error);
    assert_eq!(r.value.unwrap()["text/plain"], "2");
    assert_eq!(stdout_of(&take()), "hi\n");

    // stderr arrives as stderr (relayed by the child). Its order relative to stdout is only
    // kept for writes further apart than the relay's wake-up, as with ipykernel's streams.
    let r = s.execute("println!(\"a\"); eprintln!(\"b\"); println!(\"c\");", &no_input);
    assert!(r.error.is_none());
    let ev = take();
    let text = |want: StreamName| -> String {
        ev.iter().filter_map(|e| match e { Event::Stream { name, text } if *name == want => Some(text.as_str()), _ => None }).collect()
    };
    assert_eq!((text(StreamName::Stdout).as_str(), text(StreamName::Stderr).as_str()), ("a\nc\n", "b\n"));

    // Panics and `?` errors are errors, with the message.
    let r = s.execute("let keep = String::from(\"kept\");", &no_input);
    assert!(r.error.is_none());
    let r = s.execute("panic!(\"boom\");", &no_input);
    let e = r.error.expect("panic is an error");
    assert_eq!((e.ename.as_str(), e.evalue.as_str()), ("Panic", "boom"));
    let r = s.execute("let x: Result<u8, String> = Err(\"nope\".into());\nx?;", &no_input);
    let e = r.error.expect("? error is an error");
    assert_eq!(e.evalue, "nope");
    assert!(stdout_of(&take()).is_empty());
    let r = s.execute("keep", &no_input);
    assert_eq!(r.value.unwrap()["text/plain"], "\"kept\"");

    // Displays and REPL progress markers.
    let r = s.execute(
        "let h = display(&MimeBundle::text(\"one\"));\nh.update(&MimeBundle::text(\"two\"));\nlet mut p = Progress::new(\"x\", 2); p.inc(); p.finish();",
        &no_input,
    );
    assert!(r.error.is_none(), "{:?}", r.error);
    let ev = take();
    assert!(matches!(&ev[0], Event::Display { update: false, display_id: Some(_), .. }), "{ev:?}");
    assert!(matches!(&ev[1], Event::Display { update: true, .. }));
    assert!(ev.iter().any(|e| matches!(e, Event::Progress(p) if p.done && p.pos == 2)));

    // The interrupt flag is process-global: a SIGINT sets the one flag that every cell's copy of
    // the prelude reads; a flag left over from an earlier cell is cleared at the next cell.
    let r = s.execute("let pid = std::process::id();", &no_input);
    assert!(r.error.is_none());
    let r = s.execute("println!(\"{}\", pivot::runtime::interrupt_flag() as *const _ as usize);", &no_input);
    assert!(r.error.is_none());
    let addr1 = stdout_of(&take());
    let r = s.execute("println!(\"{}\", pivot::runtime::interrupt_flag() as *const _ as usize);", &no_input);
    assert!(r.error.is_none());
    assert_eq!(addr1, stdout_of(&take()), "every cell sees the same flag");

    let interrupter = s.interrupter();
    let seen = events.clone();
    let t = std::thread::spawn(move || {
        // Interrupt once the loop runs (not while it compiles, which would stop cargo instead).
        for _ in 0..6000 {
            if stdout_of(&seen.lock().unwrap()).contains("started") {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(300));
        interrupter.interrupt();
    });
    let r = s.execute(
        "let mut n: u64 = 0;\nprintln!(\"started\");\nloop { check_interrupt(\"loop\")?; n += 1; std::thread::sleep(std::time::Duration::from_millis(5)); }",
        &no_input,
    );
    t.join().unwrap();
    let e = r.error.expect("interrupted");
    assert_eq!(e.ename, "Interrupted", "{e:?}");
    assert!(!r.restarted);
    let r = s.execute("interrupt_requested()", &no_input);
    assert_eq!(r.value.unwrap()["text/plain"], "false", "the request was consumed");
    let r = s.execute("keep.len()", &no_input);
    assert_eq!(r.value.unwrap()["text/plain"], "4", "state survives a cooperative interrupt");

    // A cell that never checks: the user is warned (what a restart loses, how to restart at once)
    // before any kill, and a second interrupt after the warning kills at once.
    take();
    let interrupter = s.interrupter();
    let seen = events.clone();
    let t = std::thread::spawn(move || {
        for _ in 0..6000 {
            if stdout_of(&seen.lock().unwrap()).contains("spinning") {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(300));
        let first = interrupter.interrupt();
        for _ in 0..100 {
            if stream_of(&seen.lock().unwrap(), StreamName::Stderr).contains("still running") {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        (first, interrupter.interrupt())
    });
    let r = s.execute("println!(\"spinning\");\nloop { std::thread::sleep(std::time::Duration::from_millis(20)); }", &no_input);
    let (first, second) = t.join().unwrap();
    assert_eq!((first, second), (InterruptOutcome::Requested, InterruptOutcome::Killed));
    let warning = stream_of(&take(), StreamName::Stderr);
    assert!(warning.contains("still running") && warning.contains("keep") && warning.contains("Press Ctrl-C again"), "{warning}");
    let e = r.error.expect("killed");
    assert!(r.restarted && e.ename == "Interrupted" && e.evalue.contains("restarted") && e.evalue.contains("keep"), "{e:?}");
}
