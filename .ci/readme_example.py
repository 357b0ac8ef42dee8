"""Run the transforms example of a Markdown file (README.md, docs/transforms.md) and check that it prints the
output the file states. Usage: ``python .ci/readme_example.py README.md`` (from any directory, with any
installation of the package: ``.ci/wheel_check.sh`` runs it with the installed wheel)."""

import contextlib
import io
import re
import sys

text = open(sys.argv[1], encoding="utf-8").read()
section = text[text.index("## Using the transforms in your MONAI project"):]
code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
expected = re.search(r"Output of the example[^\n]*\n\n```\n(.*?)```", section, re.S).group(1)
buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    exec(compile(code, f"{sys.argv[1]} transforms example", "exec"), {"__name__": "__main__"})
got = buf.getvalue()
print(got, end="")
if got != expected:
    sys.exit(f"{sys.argv[1]}: the transforms example printed\n{got}but the file says\n{expected}")
