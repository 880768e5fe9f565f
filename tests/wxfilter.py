"""systemd's ``MemoryDenyWriteExecute=yes`` without systemd, for tests.

systemd 252 implements the setting as a seccomp filter that fails with
EPERM: ``mmap`` asking for PROT_WRITE and PROT_EXEC together, ``mprotect``
and ``pkey_mprotect`` asking for PROT_EXEC, and ``shmat`` with SHM_EXEC
(src/shared/seccomp-util.c, seccomp_memory_deny_write_execute).  This
installs the same rules (x86-64 only) on the calling process; a filter is
inherited across ``fork`` and ``execve``, so ``python tests/wxfilter.py
PROGRAM ARGS...`` runs PROGRAM the way the unit would.
"""

import ctypes
import os
import platform
import struct
import sys

_AUDIT_ARCH_X86_64 = 0xC000003E
_NR = {"mmap": 9, "mprotect": 10, "shmat": 30, "pkey_mprotect": 329}  # x86-64
_PROT_WRITE, _PROT_EXEC, _SHM_EXEC = 0x2, 0x4, 0o100000
_ALLOW, _EPERM = 0x7FFF0000, 0x00050000 | 1  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | EPERM
_LD, _JEQ, _JSET, _AND, _RET = 0x20, 0x15, 0x45, 0x54, 0x06  # classic BPF opcodes
_ARCH, _SYSCALL, _ARG2 = 4, 0, 32  # offsets in struct seccomp_data (args[2], low 32 bits)

#: (code, jump if true, jump if false, k); jumps count the instructions skipped.
_PROGRAM = [
    (_LD, 0, 0, _ARCH),
    (_JEQ, 0, 14, _AUDIT_ARCH_X86_64),        # another ABI: allow (16)
    (_LD, 0, 0, _SYSCALL),
    (_JEQ, 4, 0, _NR["mmap"]),                 # -> 8
    (_JEQ, 6, 0, _NR["mprotect"]),             # -> 11
    (_JEQ, 5, 0, _NR["pkey_mprotect"]),        # -> 11
    (_JEQ, 6, 0, _NR["shmat"]),                # -> 13
    (_RET, 0, 0, _ALLOW),
    (_LD, 0, 0, _ARG2),                        # 8: mmap prot
    (_AND, 0, 0, _PROT_WRITE | _PROT_EXEC),
    (_JEQ, 4, 5, _PROT_WRITE | _PROT_EXEC),    # both: EPERM (15), else allow (16)
    (_LD, 0, 0, _ARG2),                        # 11: mprotect prot
    (_JSET, 2, 3, _PROT_EXEC),
    (_LD, 0, 0, _ARG2),                        # 13: shmat flags
    (_JSET, 0, 1, _SHM_EXEC),
    (_RET, 0, 0, _EPERM),                      # 15
    (_RET, 0, 0, _ALLOW),                      # 16
]


def supported() -> bool:
    return sys.platform == "linux" and platform.machine() == "x86_64"


def deny_write_execute() -> None:
    """Install the filter on this process (and everything it execs)."""

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    code = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *op) for op in _PROGRAM))
    program = SockFprog(len(_PROGRAM), ctypes.addressof(code))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
    if libc.prctl(38, 1, None, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS (NoNewPrivileges=yes)
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if libc.prctl(22, 2, ctypes.byref(program), 0, 0) != 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")


if __name__ == "__main__":
    deny_write_execute()
    os.execv(sys.argv[1], sys.argv[1:])
