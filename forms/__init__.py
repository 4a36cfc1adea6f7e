"""WTForms forms; validation messages are written for the admin."""
