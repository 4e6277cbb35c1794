//! `unit_seccomp REFUSED PROGRAM [ARGS...]`: runs PROGRAM under the system-call filter of a
//! systemd unit, so the E2E tests see spad fail where the shipped unit would make it fail.
//!
//! REFUSED lists the x86_64 system-call numbers to refuse, one per line (`NUMBER [name]`; the
//! name is for the reader, blank lines and `#` comments are skipped). Each of them returns
//! EPERM, as `SystemCallErrorNumber=EPERM` makes them; every other x86_64 system call is
//! allowed. A system call of another ABI (i386, x32) kills the process, as
//! `SystemCallArchitectures=native` refuses them. Like systemd with `NoNewPrivileges=yes`, it
//! sets no_new_privs first (which keeps ambient capabilities across the exec), then installs
//! the filter, then execs PROGRAM, which inherits the filter with every child it starts.
//! The tests compute REFUSED from the unit's `SystemCallFilter=` lines (tests/tests/ops.rs).
//! x86_64 only: on another machine it says so and exits with status 2.

#[cfg(target_arch = "x86_64")]
fn main() -> anyhow::Result<()> {
    use anyhow::Context;
    use std::os::unix::process::CommandExt;

    let mut args = std::env::args_os().skip(1);
    let (Some(refused), Some(program)) = (args.next(), args.next()) else {
        anyhow::bail!("usage: unit_seccomp REFUSED_SYSCALLS_FILE PROGRAM [ARGS...]");
    };
    let text = std::fs::read_to_string(&refused)
        .with_context(|| format!("reading {}", refused.to_string_lossy()))?;
    let numbers = refused_numbers(&text)?;
    let filter = filter::program(&numbers);
    filter::install(&filter)?;
    let error = std::process::Command::new(&program).args(args).exec();
    Err(error).with_context(|| format!("exec {}", program.to_string_lossy()))
}

#[cfg(not(target_arch = "x86_64"))]
fn main() {
    eprintln!("unit_seccomp: emulates the unit's filter on x86_64 only");
    std::process::exit(2);
}

/// The numbers of a REFUSED file: the first word of each line that is not blank or a comment.
#[cfg(target_arch = "x86_64")]
fn refused_numbers(text: &str) -> anyhow::Result<Vec<u32>> {
    text.lines()
        .enumerate()
        .filter_map(|(index, line)| {
            let word = line.split_whitespace().next()?;
            (!word.starts_with('#')).then_some((index + 1, word))
        })
        .map(|(line, word)| {
            word.parse::<u32>()
                .ok()
                .filter(|&n| n < filter::X32_SYSCALL_BIT)
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "line {line}: `{word}` is not an x86_64 system-call number; write `NUMBER [name]`"
                    )
                })
        })
        .collect()
}

/// The classic BPF program and its installation.
#[cfg(target_arch = "x86_64")]
mod filter {
    use libc::{sock_filter, sock_fprog};

    /// `AUDIT_ARCH_X86_64` (linux/audit.h): EM_X86_64 | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE.
    const AUDIT_ARCH_X86_64: u32 = 62 | 0x8000_0000 | 0x4000_0000;
    /// x32 system calls arrive with the x86_64 arch and this bit set in their number.
    pub const X32_SYSCALL_BIT: u32 = 0x4000_0000;

    fn statement(code: u32, k: u32) -> sock_filter {
        sock_filter {
            code: code as u16,
            jt: 0,
            jf: 0,
            k,
        }
    }

    fn jump(code: u32, k: u32, jt: u8, jf: u8) -> sock_filter {
        sock_filter {
            code: code as u16,
            jt,
            jf,
            k,
        }
    }

    fn load_word(offset: usize) -> sock_filter {
        statement(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, offset as u32)
    }

    /// Kill on a foreign ABI, EPERM for each refused number (a compare and a return each, so no
    /// jump is longer than one instruction however long the list), allow the rest.
    pub fn program(refused: &[u32]) -> Vec<sock_filter> {
        let kill = statement(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_KILL_PROCESS);
        let eperm = statement(
            libc::BPF_RET | libc::BPF_K,
            libc::SECCOMP_RET_ERRNO | (libc::EPERM as u32 & libc::SECCOMP_RET_DATA),
        );
        let mut program = vec![
            load_word(std::mem::offset_of!(libc::seccomp_data, arch)),
            jump(
                libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K,
                AUDIT_ARCH_X86_64,
                1,
                0,
            ),
            kill,
            load_word(std::mem::offset_of!(libc::seccomp_data, nr)),
            jump(
                libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K,
                X32_SYSCALL_BIT,
                0,
                1,
            ),
            kill,
        ];
        for &number in refused {
            program.push(jump(
                libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K,
                number,
                0,
                1,
            ));
            program.push(eperm);
        }
        program.push(statement(
            libc::BPF_RET | libc::BPF_K,
            libc::SECCOMP_RET_ALLOW,
        ));
        program
    }

    /// no_new_privs, then the filter, for this process and what it execs.
    pub fn install(program: &[sock_filter]) -> anyhow::Result<()> {
        let fprog = sock_fprog {
            len: u16::try_from(program.len())?,
            filter: program.as_ptr().cast_mut(),
        };
        // SAFETY: PR_SET_NO_NEW_PRIVS takes integer arguments only and touches no memory of ours.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            anyhow::bail!("no_new_privs: {}", std::io::Error::last_os_error());
        }
        // SAFETY: `fprog` points at `program`, `len` instructions that outlive the call; the
        // kernel copies the program and does not write through the pointer.
        let rc = unsafe {
            libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &fprog as *const sock_fprog,
            )
        };
        if rc != 0 {
            anyhow::bail!("seccomp filter: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }
}
