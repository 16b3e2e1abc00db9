// SPDX-License-Identifier: GPL-2.0
/* A trivial shared library for the dlopen test (built with -shared -nostdlib -fPIC). */
int ipe_test_answer(void)
{
	return 42;
}
