"""The cluster's resolver view, as far as the report needs it (pure).

A pod's resolv.conf says ``search <ns>.svc.<domain> svc.<domain> <domain>`` and
``ndots:5``: a short name ``orders`` is asked as ``orders.<ns>.svc.<domain>``,
then with each following search domain, then as is. So one name the program
looked up shows up as several questions on the wire, and most of them fail by
design. These helpers recover the name the program looked up.
"""

from __future__ import annotations

from dataclasses import dataclass

from ktrace.rules import normalize_name


@dataclass(frozen=True)
class SearchList:
    domains: tuple[str, ...] = ()
    nameservers: tuple[str, ...] = ()

    @classmethod
    def parse(cls, resolv_conf: str) -> SearchList:
        domains: tuple[str, ...] = ()
        servers: list[str] = []
        for line in resolv_conf.splitlines():
            words = line.split("#", 1)[0].split(";", 1)[0].split()
            if not words:
                continue
            if words[0] in ("search", "domain"):
                # The last search/domain line wins, as in glibc.
                domains = tuple(normalize_name(w) for w in words[1:] if normalize_name(w))
            elif words[0] == "nameserver" and len(words) > 1:
                servers.append(words[1])
        return cls(domains, tuple(servers))

    def stems(self, qname: str) -> list[str]:
        """Every name whose search-list expansion can produce ``qname``: itself and
        ``qname`` without each search domain it ends with."""
        name = normalize_name(qname)
        found = [name]
        for domain in self.domains:
            if name.endswith("." + domain) and len(name) > len(domain) + 1:
                found.append(name[: -len(domain) - 1])
        return found

    def candidates(self, stem: str) -> list[str]:
        """What a resolver asks for ``stem``: with each search domain, and as is."""
        return [f"{stem}.{domain}" for domain in self.domains] + [stem]

    def looked_up(self, qname: str) -> str:
        """The name the program most likely looked up: the shortest stem."""
        return min(self.stems(qname), key=len)

    @property
    def namespace(self) -> str | None:
        """The pod's namespace: the first search domain of the form ``<ns>.svc.<domain>``."""
        for domain in self.domains:
            labels = domain.split(".")
            if len(labels) >= 3 and labels[1] == "svc":
                return labels[0]
        return None

    @property
    def cluster_domain(self) -> str | None:
        """``cluster.local`` from the search domain ``svc.cluster.local``."""
        for domain in self.domains:
            if domain.startswith("svc.") and len(domain) > 4:
                return domain[4:]
        return None

    def service_name(self, stem: str, namespace: str) -> str | None:
        domain = self.cluster_domain
        return f"{stem}.{namespace}.svc.{domain}" if domain else None

    def namespace_of(self, name: str) -> str | None:
        """``other-ns`` for ``hello.other-ns.svc.cluster.local``."""
        domain = self.cluster_domain
        if not domain:
            return None
        suffix = ".svc." + domain
        name = normalize_name(name)
        if not name.endswith(suffix):
            return None
        labels = name[: -len(suffix)].split(".")
        return labels[-1] if len(labels) >= 2 else None


def hosts_names(text: str) -> frozenset[str]:
    """Every name (and alias) of a hosts file, normalized: ``10.1.2.3 pod-name pod`` gives both."""
    names: set[str] = set()
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        for word in words[1:]:
            name = normalize_name(word)
            if name:
                names.add(name)
    return frozenset(names)
