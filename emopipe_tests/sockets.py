"""The TCP sockets listening on this machine, with the process that holds each (from /proc): what a
test reads to assert that emopipe and its libraries open no port beyond loopback."""

import ipaddress
import os
import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class Listener:
    address: str
    port: int
    pid: int | None
    command: str

    @property
    def loopback(self) -> bool:
        ip = ipaddress.ip_address(self.address)
        mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1 is the loopback address too
        return (mapped or ip).is_loopback


def _socket_owners() -> dict[str, tuple[int, str]]:
    owners = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                command = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # the process ended, or is not ours to read
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                owners[target[8:-1]] = (int(pid), command)
    return owners


def _address(hex_address: str, family: int) -> str:
    raw = bytes.fromhex(hex_address)
    # /proc prints each 32-bit word in host (little-endian) order
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return socket.inet_ntop(family, raw)


def listeners() -> list[Listener]:
    owners = _socket_owners()
    found = []
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] != "0A":  # TCP_LISTEN
                    continue
                address, port = fields[1].split(":")
                pid, command = owners.get(fields[9], (None, "?"))
                found.append(Listener(_address(address, family), int(port, 16), pid, command))
    return found
