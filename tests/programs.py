"""One small program per runtime the embedded engine may find, for end-to-end checks."""

from __future__ import annotations

# language -> (file name, source that prints "hello <first stdin line> <args...>")
HELLO: dict[str, tuple[str, str]] = {
    "python": ("main.py", "import sys\nprint('hello', input(), *sys.argv[1:])\n"),
    "bash": ("main.sh", 'read line\necho hello "$line" "$@"\n'),
    "javascript": (
        "main.js",
        "const l = require('fs').readFileSync(0, 'utf8').split('\\n')[0];\n"
        "console.log(['hello', l, ...process.argv.slice(2)].join(' '));\n",
    ),
    "c": (
        "main.c",
        '#include <stdio.h>\nint main(int c, char **v) { char l[64]; scanf("%63s", l);'
        ' printf("hello %s", l); for (int i = 1; i < c; i++) printf(" %s", v[i]);'
        ' printf("\\n"); return 0; }\n',
    ),
    "c++": (
        "main.cpp",
        "#include <iostream>\n#include <string>\nint main(int c, char **v) { std::string l;"
        ' std::getline(std::cin, l); std::cout << "hello " << l; for (int i = 1; i < c; i++)'
        ' std::cout << " " << v[i]; std::cout << std::endl; }\n',
    ),
    "java": (
        "Main.java",
        "public class Main { public static void main(String[] a) {"
        " String l = new java.util.Scanner(System.in).nextLine();"
        ' System.out.println("hello " + l'
        ' + (a.length > 0 ? " " + String.join(" ", a) : "")); } }\n',
    ),
}


def hello_body(language: str, version: str = "*") -> dict[str, object]:
    name, source = HELLO[language]
    return {
        "language": language,
        "version": version,
        "files": [{"name": name, "content": source}],
        "stdin": "world",
        "args": ["a", "b"],
    }
