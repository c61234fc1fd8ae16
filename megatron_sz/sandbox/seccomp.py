"""Seccomp-bpf filters for the sandbox, built as raw classic BPF (no libseccomp binding).

What is unusual here: we write the BPF program ourselves (a dozen lines of encoding) instead
of binding libseccomp. The program is a flat deny-list over syscall numbers, so nothing
needs a compiler, it loads with one ``prctl`` through ctypes inside the sandbox, and the same
bytes go to bubblewrap's ``--seccomp FD``. The only architecture-specific parts are the
syscall numbers below (x86_64 and aarch64, taken from the kernel's ``unistd`` headers).

The filter denies what a pure computation never needs (the list in issue 14 and
``../shared/design/SANDBOX.md``): sockets and socket calls, ptrace and cross-process memory,
mount/unshare/setns and the new mount API, keyctl, bpf, perf_event_open, module and kexec
loading, io_uring (it opens sockets without ``socket(2)``), userfaultfd, SysV IPC and POSIX
message queues (state that would survive into the next execution of a pooled worker),
memfd (memory outside every size limit), clock/host/reboot/swap administration, and
``clone`` with any namespace flag. ``clone3`` answers ENOSYS, which makes glibc fall back to
``clone``, whose flags a classic BPF filter can inspect. Other architectures or x32 calls
on x86_64 kill the process.

Three stages use it:

* ``base``: loaded by bubblewrap before the interpreter starts (execve still allowed);
* ``server``: loaded by the fork server after start-up, adds ``execve``/``execveat``, so no
  execution can start another program;
* ``child`` (fallback tier only, no PID namespace): adds no process creation (``fork``,
  ``vfork``, ``clone`` without ``CLONE_THREAD``) and signals only to the child itself, whose
  pid is patched into the program at fork time.
"""
from __future__ import annotations

import errno
import platform
import struct

__all__ = ["SeccompUnsupported", "build_filter", "PID_PLACEHOLDER", "supported"]

# classic BPF opcodes
_LD_W_ABS, _JEQ_K, _JGE_K, _JSET_K, _RET_K = 0x20, 0x15, 0x35, 0x45, 0x06
_RET_ALLOW, _RET_KILL_PROCESS, _RET_ERRNO = 0x7FFF0000, 0x80000000, 0x00050000
_OFF_NR, _OFF_ARCH, _OFF_ARG0 = 0, 4, 16

#: Namespace flags that ``clone`` may not carry (CLONE_NEWTIME shares bits with the exit
#: signal in ``clone``, and is refused through ``unshare``, which is denied outright).
_CLONE_NS = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 \
    | 0x40000000  # NEWNS NEWCGROUP NEWUTS NEWIPC NEWUSER NEWPID NEWNET
_CLONE_THREAD = 0x00010000
#: A sentinel immediate replaced by the child's pid (little-endian hex) in the fallback tier.
_PID_SENTINEL = 0x5A5AA5A5
PID_PLACEHOLDER = "%PID%"

_DENY = """
socket socketpair connect bind listen accept accept4 sendto recvfrom sendmsg recvmsg
sendmmsg recvmmsg shutdown getsockopt setsockopt getsockname getpeername
ptrace process_vm_readv process_vm_writev kcmp pidfd_getfd
mount umount2 pivot_root chroot unshare setns open_tree move_mount fsopen fsconfig fsmount
fspick mount_setattr name_to_handle_at open_by_handle_at fanotify_init
keyctl add_key request_key bpf perf_event_open lookup_dcookie
init_module finit_module delete_module kexec_load kexec_file_load
io_uring_setup io_uring_enter io_uring_register userfaultfd
shmget shmat shmctl shmdt msgget msgsnd msgrcv msgctl semget semop semctl semtimedop
mq_open mq_unlink mq_timedsend mq_timedreceive mq_notify mq_getsetattr
memfd_create memfd_secret
reboot swapon swapoff settimeofday clock_settime adjtimex clock_adjtime acct quotactl
quotactl_fd syslog vhangup iopl ioperm sethostname setdomainname personality uselib ustat
sysfs nfsservctl
""".split()

_X86_64 = dict(
    socket=41, socketpair=53, connect=42, bind=49, listen=50, accept=43, accept4=288,
    sendto=44, recvfrom=45, sendmsg=46, recvmsg=47, sendmmsg=307, recvmmsg=299, shutdown=48,
    getsockopt=55, setsockopt=54, getsockname=51, getpeername=52,
    ptrace=101, process_vm_readv=310, process_vm_writev=311, kcmp=312, pidfd_getfd=438,
    mount=165, umount2=166, pivot_root=155, chroot=161, unshare=272, setns=308, open_tree=428,
    move_mount=429, fsopen=430, fsconfig=431, fsmount=432, fspick=433, mount_setattr=442,
    name_to_handle_at=303, open_by_handle_at=304, fanotify_init=300,
    keyctl=250, add_key=248, request_key=249, bpf=321, perf_event_open=298, lookup_dcookie=212,
    init_module=175, finit_module=313, delete_module=176, kexec_load=246, kexec_file_load=320,
    io_uring_setup=425, io_uring_enter=426, io_uring_register=427, userfaultfd=323,
    shmget=29, shmat=30, shmctl=31, shmdt=67, msgget=68, msgsnd=69, msgrcv=70, msgctl=71,
    semget=64, semop=65, semctl=66, semtimedop=220,
    mq_open=240, mq_unlink=241, mq_timedsend=242, mq_timedreceive=243, mq_notify=244,
    mq_getsetattr=245, memfd_create=319, memfd_secret=447,
    reboot=169, swapon=167, swapoff=168, settimeofday=164, clock_settime=227, adjtimex=159,
    clock_adjtime=305, acct=163, quotactl=179, quotactl_fd=443, syslog=103, vhangup=153,
    iopl=172, ioperm=173, sethostname=170, setdomainname=171, personality=135, uselib=134,
    ustat=136, sysfs=139, nfsservctl=180,
    # arg-checked / stage-specific
    clone=56, clone3=435, fork=57, vfork=58, execve=59, execveat=322, kill=62, tkill=200,
    tgkill=234, rt_sigqueueinfo=129, rt_tgsigqueueinfo=297, pidfd_open=434,
    pidfd_send_signal=424,
)
_AARCH64 = dict(
    socket=198, socketpair=199, connect=203, bind=200, listen=201, accept=202, accept4=242,
    sendto=206, recvfrom=207, sendmsg=211, recvmsg=212, sendmmsg=269, recvmmsg=243,
    shutdown=210, getsockopt=209, setsockopt=208, getsockname=204, getpeername=205,
    ptrace=117, process_vm_readv=270, process_vm_writev=271, kcmp=272, pidfd_getfd=438,
    mount=40, umount2=39, pivot_root=41, chroot=51, unshare=97, setns=268, open_tree=428,
    move_mount=429, fsopen=430, fsconfig=431, fsmount=432, fspick=433, mount_setattr=442,
    name_to_handle_at=264, open_by_handle_at=265, fanotify_init=262,
    keyctl=219, add_key=217, request_key=218, bpf=280, perf_event_open=241, lookup_dcookie=18,
    init_module=105, finit_module=273, delete_module=106, kexec_load=104, kexec_file_load=294,
    io_uring_setup=425, io_uring_enter=426, io_uring_register=427, userfaultfd=282,
    shmget=194, shmat=196, shmctl=195, shmdt=197, msgget=186, msgsnd=189, msgrcv=188,
    msgctl=187, semget=190, semop=193, semctl=191, semtimedop=192,
    mq_open=180, mq_unlink=181, mq_timedsend=182, mq_timedreceive=183, mq_notify=184,
    mq_getsetattr=185, memfd_create=279, memfd_secret=447,
    reboot=142, swapon=224, swapoff=225, settimeofday=170, clock_settime=112, adjtimex=171,
    clock_adjtime=266, acct=89, quotactl=60, quotactl_fd=443, syslog=116, vhangup=58,
    sethostname=161, setdomainname=162, personality=92, nfsservctl=42,
    clone=220, clone3=435, execve=221, execveat=281, kill=129, tkill=130, tgkill=131,
    rt_sigqueueinfo=138, rt_tgsigqueueinfo=240, pidfd_open=434, pidfd_send_signal=424,
)
#: machine -> (AUDIT_ARCH_*, syscall table)
_ARCHES = {
    "x86_64": (0xC000003E, _X86_64),
    "aarch64": (0xC00000B7, _AARCH64),
}


class SeccompUnsupported(RuntimeError):
    """No syscall table for this machine's architecture."""


def supported(machine: str | None = None) -> bool:
    return (machine or platform.machine()) in _ARCHES


def _ins(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("<HBBI", code, jt, jf, k & 0xFFFFFFFF)


def build_filter(stage: str, *, machine: str | None = None) -> bytes:
    """The BPF program (struct sock_filter[]) for ``stage`` in base | server | child.

    For ``child`` the program contains a placeholder pid; ``child_template`` turns it into
    the hex string the server patches per child.
    """
    if stage not in ("base", "server", "child"):
        raise ValueError(f"unknown seccomp stage {stage!r}; expected base, server or child")
    machine = machine or platform.machine()
    if machine not in _ARCHES:
        raise SeccompUnsupported(f"no seccomp syscall table for architecture {machine!r} "
                                 f"(have: {', '.join(_ARCHES)})")
    audit_arch, nr = _ARCHES[machine]
    eperm = _RET_ERRNO | errno.EPERM
    prog = [
        _ins(_LD_W_ABS, _OFF_ARCH),
        _ins(_JEQ_K, audit_arch, 1, 0),
        _ins(_RET_K, _RET_KILL_PROCESS),
        _ins(_LD_W_ABS, _OFF_NR),
    ]
    if machine == "x86_64":  # the x32 ABI: same arch, syscall numbers with bit 30 set
        prog += [_ins(_JGE_K, 0x40000000, 0, 1), _ins(_RET_K, eperm)]

    def deny(name: str, ret: int = eperm) -> None:
        if name in nr:
            prog.extend([_ins(_JEQ_K, nr[name], 0, 1), _ins(_RET_K, ret)])

    for name in _DENY:
        deny(name)
    deny("clone3", _RET_ERRNO | errno.ENOSYS)
    deny("pidfd_send_signal")
    deny("pidfd_open")
    if stage in ("server", "child"):
        deny("execve")
        deny("execveat")
    if stage == "child":
        deny("fork")
        deny("vfork")
        deny("tkill")
    # clone: no namespace flags; in the child stage also threads only
    prog += [_ins(_JEQ_K, nr["clone"], 0, 5 if stage == "child" else 3),
             _ins(_LD_W_ABS, _OFF_ARG0),
             _ins(_JSET_K, _CLONE_NS, 0, 1),
             _ins(_RET_K, eperm)]
    if stage == "child":
        prog += [_ins(_JSET_K, _CLONE_THREAD, 1, 0), _ins(_RET_K, eperm)]
    prog.append(_ins(_LD_W_ABS, _OFF_NR))
    if stage == "child":
        # kill / tgkill / rt_(tg)sigqueueinfo: only to ourselves (first argument == our pid)
        for name in ("kill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo"):
            prog += [_ins(_JEQ_K, nr[name], 0, 4),
                     _ins(_LD_W_ABS, _OFF_ARG0),
                     _ins(_JEQ_K, _PID_SENTINEL, 1, 0),
                     _ins(_RET_K, eperm),
                     _ins(_LD_W_ABS, _OFF_NR)]
    prog.append(_ins(_RET_K, _RET_ALLOW))
    if len(prog) > 4096:  # BPF_MAXINSNS
        raise AssertionError("seccomp program too long")  # our own bug, not a user error
    return b"".join(prog)


def child_template(machine: str | None = None) -> str:
    """Hex of the child-stage program with the pid sentinel replaced by ``%PID%``."""
    hexprog = build_filter("child", machine=machine).hex()
    sentinel = struct.pack("<I", _PID_SENTINEL).hex()
    return hexprog.replace(sentinel, PID_PLACEHOLDER)
