DROP TABLE uploaded_files;
