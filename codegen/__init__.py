"""fxplan.codegen"""
