"""A conformance Report as text a vendor can paste into a bug report, and as JUnit XML."""

import platform
import textwrap


def _versions(report):
    from .. import __version__
    q = report.query if isinstance(report.query, dict) else {}
    plugin = (f"{q.get('plugin', '?')} {q.get('version', '?')} ({q.get('vendor', '?')}), "
              f"api {q.get('required_api_version', '?')}") if q else "Plugin.Query failed"
    return plugin, f"xapi-storage-suite {__version__}, Python {platform.python_version()}"


def table(report, width=100):
    plugin, tool = _versions(report)
    lines = [f"xapi-storage conformance: {report.plugin_dir}",
             f"plugin: {plugin}", f"run by: {tool}", ""]
    name_w = max([len(r.name) for r in report.results] + [5])
    lines.append(f"{'check':<{name_w}}  result  calls   time  detail")
    indent = " " * (name_w + 24)
    for r in report.results:
        head = f"{r.name:<{name_w}}  {r.status:<6}  {r.calls:>5}  {r.seconds:>4.1f}s"
        detail = textwrap.wrap(r.detail, max(30, width - len(indent)), break_on_hyphens=False,
                               break_long_words=False) or [""]
        lines.append(f"{head}  {detail[0]}".rstrip())
        lines.extend(indent + d for d in detail[1:])
    counts = {s: sum(1 for r in report.results if r.status == s) for s in ("PASS", "FAIL", "SKIP")}
    lines.append("")
    lines.append(f"{len(report.results)} checks: {counts['PASS']} passed, {counts['FAIL']} failed, "
                 f"{counts['SKIP']} skipped, in {report.seconds:.1f}s")
    for t in report.teardown:
        lines.append(f"teardown problem: {t}")
    return "\n".join(lines) + "\n"


def junit(report):
    """JUnit XML: one testsuite, one testcase per check (skipped and failure elements)."""
    import xml.etree.ElementTree as ET
    plugin, tool = _versions(report)
    suite = ET.Element("testsuite", {
        "name": "xapi-storage conformance",
        "tests": str(len(report.results) + (1 if report.teardown else 0)),
        "failures": str(len(report.failed) + (1 if report.teardown else 0)),
        "errors": "0",
        "skipped": str(sum(1 for r in report.results if r.status == "SKIP")),
        "time": f"{report.seconds:.3f}",
    })
    props = ET.SubElement(suite, "properties")
    for k, v in (("plugin_dir", report.plugin_dir), ("plugin", plugin), ("tool", tool)):
        ET.SubElement(props, "property", {"name": k, "value": v})
    classname = "conformance." + (report.query.get("plugin", "plugin")
                                  if isinstance(report.query, dict) else "plugin")
    for r in report.results:
        case = ET.SubElement(suite, "testcase", {"classname": classname, "name": r.name,
                                                 "time": f"{r.seconds:.3f}"})
        if r.status == "FAIL":
            ET.SubElement(case, "failure", {"message": r.detail[:200]}).text = r.detail
        elif r.status == "SKIP":
            ET.SubElement(case, "skipped", {"message": r.detail})
    if report.teardown:
        case = ET.SubElement(suite, "testcase", {"classname": classname, "name": "teardown"})
        text = "\n".join(report.teardown)
        ET.SubElement(case, "failure", {"message": report.teardown[0][:200]}).text = text
    return ET.tostring(suite, encoding="unicode")
