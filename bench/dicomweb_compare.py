"""The hub's DICOMweb JSON beside Orthanc's DICOMweb plugin for the same files, field by field.

Run from the repository root: ``.venv/bin/python -m bench.dicomweb_compare [--json PATH]``
(needs Debian's ``orthanc`` and ``orthanc-dicomweb``; the packaged service may stay stopped).

Debian's Orthanc 1.10 with its DICOMweb plugin (a temporary configuration, HTTP on a free port,
local access only) and a hub on the embedded defaults (SQLite, a local object directory, in this
process) get the same files: pydicom's bundled ``CT_small.dcm``, ``MR_small.dcm``,
``MR_small_jp2klossless.dcm`` (JPEG 2000) and ``JPEG2000.dcm`` (a JPEG 2000 NM), through Orthanc's
REST API and the hub's Ingest service. Then, for every study, series and instance, the QIDO-RS
answers and the WADO-RS metadata of both are compared tag by tag: values equal, values that differ
(printed), tags only one of them returns. Bulk data is compared by kind only (a ``BulkDataURI`` or
``InlineBinary`` on either side).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from pydicom.data import get_testdata_file
from rich.console import Console
from rich.table import Table

from bench._report import machine, machine_line

console = Console()
FILES = ("CT_small.dcm", "MR_small.dcm", "MR_small_jp2klossless.dcm", "JPEG2000.dcm")
PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Orthanc:
    def __init__(self, work: Path, binary: str, *, root: str = "/dicom-web/") -> None:
        self.http = _free_port()
        config = {
            "Name": "compare", "StorageDirectory": str(work / "storage"), "IndexDirectory": str(work / "index"),
            "HttpPort": self.http, "DicomPort": _free_port(), "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "Plugins": [str(PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": root, "StudiesMetadata": "Full", "SeriesMetadata": "Full"},
        }  # fmt: skip
        (work / "orthanc.json").write_text(json.dumps(config))
        self.log = (work / "orthanc.log").open("wb")
        self.proc = subprocess.Popen([binary, str(work / "orthanc.json")], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                self.get("/system")
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("Orthanc did not start (see orthanc.log)") from None
                time.sleep(0.2)

    def get(self, path: str, accept: str = "application/json") -> Any:
        request = urllib.request.Request(f"http://127.0.0.1:{self.http}{path}", headers={"Accept": accept})
        with urllib.request.urlopen(request, timeout=30) as answer:
            return json.loads(answer.read())

    def store(self, data: bytes) -> None:
        request = urllib.request.Request(f"http://127.0.0.1:{self.http}/instances", data=data, method="POST")
        with urllib.request.urlopen(request, timeout=30) as answer:
            answer.read()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def _upload(address: str, token: str, path: Path, study: str) -> None:
    from teleread.client import open_channel
    from teleread.v1 import common_pb2, ingest_pb2, ingest_pb2_grpc

    ingest = ingest_pb2_grpc.IngestStub(open_channel(address, token=token))
    opened = ingest.OpenExam(
        ingest_pb2.OpenExamRequest(client_exam_key=uuid.uuid4().hex, kind=common_pb2.EXAM_KIND_IMAGING,
                                   priority=common_pb2.PRIORITY_ROUTINE, study_instance_uid=study),
        timeout=10,
    )  # fmt: skip
    data = path.read_bytes()
    begun = ingest.BeginUpload(
        ingest_pb2.BeginUploadRequest(exam_id=opened.exam_id, size=len(data), sha256=hashlib.sha256(data).hexdigest(),
                                      role="dicom"),
        timeout=10,
    )  # fmt: skip
    ingest.Upload(iter([ingest_pb2.UploadChunk(upload_id=begun.upload_id, offset=0, data=data)]), timeout=30)
    ingest.CommitExam(ingest_pb2.CommitExamRequest(exam_id=opened.exam_id, expected_objects=1), timeout=10)


def _kind(element: dict[str, Any]) -> Any:
    if "BulkDataURI" in element or "InlineBinary" in element:
        return ("binary", element.get("vr"))
    return (element.get("vr"), element.get("Value"))


def compare(ours: dict[str, Any], theirs: dict[str, Any], level: str, counts: dict[str, Counter[str]],
            differ: dict[str, set[str]], only: dict[str, set[str]]) -> None:  # fmt: skip
    for tag in sorted(set(ours) | set(theirs)):
        if tag in ours and tag in theirs:
            if _kind(ours[tag]) == _kind(theirs[tag]):
                counts[level]["equal"] += 1
            else:
                counts[level]["differ"] += 1
                differ[level].add(f"{tag} ours {_kind(ours[tag])!s:.70} / Orthanc {_kind(theirs[tag])!s:.70}")
        else:
            counts[level]["only ours" if tag in ours else "only Orthanc"] += 1
            only[level].add(f"{tag} ({'ours' if tag in ours else 'Orthanc'})")


def run(work: Path) -> dict[str, Any]:
    import pydicom
    from dicomweb_client.api import DICOMwebClient

    from teleread.app.hub import build_hub, create_server
    from teleread.auth import Role, add_principal, add_site
    from teleread.reader.hub.dicomweb import DicomwebServer, create_app
    from teleread.settings import Settings

    binary = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
    if not os.access(binary, os.X_OK) or not PLUGIN.exists():
        raise SystemExit("needs Debian's orthanc and orthanc-dicomweb: apt-get install -y orthanc orthanc-dicomweb")
    (work / "orthanc").mkdir()
    orthanc = Orthanc(work / "orthanc", binary)
    hub = build_hub(Settings(data_dir=work / "hub", cpu_workers=0).updated(http__port=0))
    server, port = create_server(hub, host="127.0.0.1", port=0)
    server.start()
    web = DicomwebServer(create_app(hub.engine, hub.authenticator.authenticate, hub.store), host="127.0.0.1", port=0)
    web.start()
    try:
        add_site(hub.engine, code="compare", name="Comparison clinic", lead_hospital="compare-hosp")
        token = add_principal(hub.engine, name="compare-site", role=Role.SITE, site_code="compare")
        studies = []
        for name in FILES:
            path = Path(str(get_testdata_file(name)))
            study = str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
            orthanc.store(path.read_bytes())
            _upload(f"127.0.0.1:{port}", token, path, study)
            studies.append(study)
        ours = DICOMwebClient(web.url, headers={"Authorization": f"Bearer {token}"})
        theirs = DICOMwebClient(f"http://127.0.0.1:{orthanc.http}/dicom-web")
        counts: dict[str, Counter[str]] = {k: Counter() for k in ("study", "series", "instance", "metadata")}
        differ: dict[str, set[str]] = {k: set() for k in counts}
        only: dict[str, set[str]] = {k: set() for k in counts}
        for study in sorted(set(studies)):
            [o_study] = ours.search_for_studies(search_filters={"StudyInstanceUID": study})
            [t_study] = theirs.search_for_studies(search_filters={"StudyInstanceUID": study})
            compare(o_study, t_study, "study", counts, differ, only)
            o_series = {s["0020000E"]["Value"][0]: s for s in ours.search_for_series(study)}
            t_series = {s["0020000E"]["Value"][0]: s for s in theirs.search_for_series(study)}
            for uid in sorted(set(o_series) & set(t_series)):
                compare(o_series[uid], t_series[uid], "series", counts, differ, only)
                o_inst = {i["00080018"]["Value"][0]: i for i in ours.search_for_instances(study, uid)}
                t_inst = {i["00080018"]["Value"][0]: i for i in theirs.search_for_instances(study, uid)}
                for sop in sorted(set(o_inst) & set(t_inst)):
                    compare(o_inst[sop], t_inst[sop], "instance", counts, differ, only)
                    o_meta = ours.retrieve_instance_metadata(study, uid, sop)  # the first dataset of the answer
                    t_meta = theirs.retrieve_instance_metadata(study, uid, sop)
                    compare(o_meta, t_meta, "metadata", counts, differ, only)
        return {"counts": {k: dict(v) for k, v in counts.items()},
                "differ": {k: sorted(v) for k, v in differ.items()}, "only": {k: sorted(v) for k, v in only.items()},
                "studies": len(set(studies))}  # fmt: skip
    finally:
        web.stop()
        server.stop(grace=None)
        hub.close()
        orthanc.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, default=None, metavar="PATH")
    args = parser.parse_args()
    info = machine()
    with tempfile.TemporaryDirectory(prefix="teleread-dicomweb-compare-") as tmp:
        result = run(Path(tmp))
    table = Table(title=f"teleread DICOMweb beside Orthanc 1.10's DICOMweb plugin ({result['studies']} studies)")
    for column in ("answer", "tags equal", "values differ", "only teleread", "only Orthanc"):
        table.add_column(column)
    for level, c in result["counts"].items():
        table.add_row(level, str(c.get("equal", 0)), str(c.get("differ", 0)), str(c.get("only ours", 0)),
                      str(c.get("only Orthanc", 0)))  # fmt: skip
    console.print(table)
    for level in result["counts"]:
        for line in result["differ"][level]:
            console.print(f"[yellow]{level} differs[/]: {line}")
        if result["only"][level]:
            console.print(f"{level}, only one side: {', '.join(result['only'][level])}")
    console.print(machine_line(info))
    if args.json:
        args.json.write_text(json.dumps({"machine": info, **result}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
