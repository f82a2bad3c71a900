"""PNG plots through gnuplot (Debian: gnuplot-nox, installed by launch/setup_debian.sh): data blocks are
written into the script itself, so one script file reproduces one PNG."""

import os
import shutil
import subprocess


class GnuplotError(RuntimeError):
    pass


def require_gnuplot():
    path = shutil.which("gnuplot")
    if path is None:
        raise GnuplotError("gnuplot not found: install it with launch/setup_debian.sh (Debian package gnuplot-nox)")
    return path


def quote(text):
    """A gnuplot string literal."""
    return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"') + '"'


def data_block(name, rows):
    """A named inline data block ($name << EOD ... EOD) of rows of numbers or quoted strings."""
    lines = [f"${name} << EOD"]
    for row in rows:
        lines.append(" ".join(quote(v) if isinstance(v, str) else ("NaN" if v is None else repr(float(v)))
                              for v in row))
    lines.append("EOD")
    return "\n".join(lines)


def render(script_body, png_path, width=900, height=560, keep_script=False):
    """Runs gnuplot on the script (pngcairo terminal, output png_path); keeps the script beside the PNG
    as NAME.gp when keep_script, else removes it. Raises GnuplotError with gnuplot's message."""
    gnuplot = require_gnuplot()
    script = "\n".join([f"set terminal pngcairo size {width},{height} font 'sans,10' noenhanced",
                        f"set output {quote(png_path)}", script_body, "unset output"]) + "\n"
    script_path = os.path.splitext(png_path)[0] + ".gp"
    with open(script_path, "w", encoding="utf-8") as f:
        f.write(script)
    done = subprocess.run([gnuplot, script_path], capture_output=True, text=True, timeout=120)
    if done.returncode != 0 or not os.path.isfile(png_path):
        raise GnuplotError(f"gnuplot failed on {script_path} (kept): {done.stderr.strip()[:800]}")
    if not keep_script:
        os.unlink(script_path)
    return png_path
