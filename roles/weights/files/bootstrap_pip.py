#!/usr/bin/env python3
"""Give a ``--without-pip`` venv its pip from a find-links page (hosts without ensurepip).

usage: bootstrap_pip.py VENV FIND_LINKS_URL [CA_FILE]

Reads the page (a directory listing or a PEP 503 page), downloads the newest ``pip-*.whl``
it links and runs pip from that wheel to install itself into VENV, with no index.
"""
import os
import re
import ssl
import subprocess
import sys
import urllib.parse
import urllib.request


def main(venv, links, cafile=None):
    ctx = ssl.create_default_context(cafile=cafile) if cafile else None
    base = links if links.endswith("/") else links + "/"
    with urllib.request.urlopen(base, timeout=60, context=ctx) as r:
        page = r.read().decode("utf-8", "replace")
    wheels = sorted(set(re.findall(r'href="([^"]*pip-[0-9][^"/]*-py3-none-any\.whl)"', page)),
                    key=lambda h: [int(x) for x in re.findall(r"pip-([0-9.]+)-", h)[0].split(".") if x.isdigit()])
    if not wheels:
        sys.exit("no pip-*.whl linked from %s" % base)
    url = urllib.parse.urljoin(base, wheels[-1])
    dest = os.path.join(venv, os.path.basename(urllib.parse.urlsplit(url).path))
    with urllib.request.urlopen(url, timeout=120, context=ctx) as r, open(dest, "wb") as out:
        out.write(r.read())
    py = os.path.join(venv, "bin", "python")
    subprocess.run([py, os.path.join(dest, "pip"), "install", "--no-index", "--find-links", base,
                    "--disable-pip-version-check", "-q", dest], check=True)
    os.unlink(dest)
    print("pip installed into %s from %s" % (venv, url))


if __name__ == "__main__":
    main(*sys.argv[1:])
