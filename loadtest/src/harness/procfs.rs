//! What a process costs, read from `/proc`: CPU time (all threads, nanoseconds, from
//! `schedstat`) and resident memory, each summed over the process and its children (nginx and
//! other pre-forking servers do their work in worker processes).

/// `pid` and its direct children.
fn tree(pid: u32) -> Vec<u32> {
    let mut pids = vec![pid];
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Some(child) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
            // The parent pid is the second field after the parenthesised command name.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if ppid == Some(pid) {
                pids.push(child);
            }
        }
    }
    pids
}

/// CPU time of every thread of `pid` and its children, in nanoseconds.
pub fn cpu_ns(pid: u32) -> Option<u64> {
    std::fs::metadata(format!("/proc/{pid}")).ok()?;
    let mut total = 0u64;
    for p in tree(pid) {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for entry in tasks.flatten() {
            let text = std::fs::read_to_string(entry.path().join("schedstat")).unwrap_or_default();
            total += text
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Some(total)
}

/// Resident set size of `pid` and its children, in bytes.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    std::fs::metadata(format!("/proc/{pid}")).ok()?;
    let mut total = 0;
    for p in tree(pid) {
        let status = std::fs::read_to_string(format!("/proc/{p}/status")).unwrap_or_default();
        let kb: u64 = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        total += kb * 1024;
    }
    Some(total)
}

/// Raises this process's open-file limit to its hard limit (held streams need many sockets).
pub fn raise_nofile() -> u64 {
    // SAFETY: getrlimit/setrlimit on a local struct.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            return lim.rlim_cur;
        }
    }
    0
}
