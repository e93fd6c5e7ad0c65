"""Protocol conformance through jupyter_kernel_test, with Rust samples."""
from __future__ import annotations

import unittest

import jupyter_kernel_test as jkt
from jupyter_client.manager import start_new_kernel

from pivot_testing import STARTUP_TIMEOUT, chained_kernel_env


class PivotKernelTests(jkt.KernelTests):
    kernel_name = "pivot"
    language_name = "rust"
    file_extension = ".rs"

    @classmethod
    def setUpClass(cls) -> None:
        cls.km, cls.kc = start_new_kernel(kernel_name=cls.kernel_name, startup_timeout=120, env=chained_kernel_env())
        # Wait for the prelude once, so every test's 15 s budget is about the test itself.
        cls.kc.execute_interactive("let _warm = 1;", timeout=STARTUP_TIMEOUT)

    code_hello_world = 'println!("hello, world");'
    code_stderr = 'eprintln!("oops, on stderr");'

    completion_samples = [
        {"text": "std::collections::BTreeSe", "matches": {"BTreeSet"}},
        {"text": ":de", "matches": {":dep"}},
    ]
    complete_code_samples = ["let x = 1;", "fn f() -> i32 { 1 }", ":vars", "let s = \"(\";"]
    incomplete_code_samples = ["fn foo(", "if true {", "let s = \"abc", "let v = vec![1,\n2,"]
    invalid_code_samples = ["fn foo() }", ")", "let x = (1];"]

    code_generate_error = 'panic!("boom");'

    code_execute_result = [
        {"code": "1 + 2", "result": "3"},
        {"code": '"ab".to_string() + "c"', "result": '"abc"'},
        {"code": 'MimeBundle::text("t").with_html("<i>t</i>")', "mime": "text/html", "result": "<i>t</i>"},
    ]
    code_display_data = [
        {"code": 'display(&MimeBundle::text("x").with_html("<b>x</b>"));', "mime": "text/html"},
        {"code": 'display(&MimeBundle::text("img").with_png(&[137, 80, 78, 71]));', "mime": "image/png"},
    ]

    supported_history_operations = ("tail", "range", "search")
    code_history_pattern = "1 + *"

    code_inspect_sample = "std::vec::Vec"
    code_clear_output = "clear_output(false);"


if __name__ == "__main__":
    unittest.main()
